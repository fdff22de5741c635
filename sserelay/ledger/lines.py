"""The JSON Lines record format: the `.jsonl` ledger and every fallback file.

One JSON object per line, each with a `type`:

    {"type": "meta", "schema_version": 1}                      first line; again after an upgrade
    {"type": "start" | "checkpoint" | "finish", "at": T, "by": INSTANCE, "row": {...}}
    {"type": "heartbeat" | "close", "at": T, "by": INSTANCE}   alive / ended cleanly

Reading replays the records: the latest record of a row (instance, id, started_at) wins,
except that a start or checkpoint never reopens an ended row. An append-only file cannot
be rewritten to migrate it, so older records are upgraded as they are read (`UPGRADES`)
and a writer of a newer version appends a new meta line before its own records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .errors import LedgerError
from .row import UsageRow, format_timestamp, parse_timestamp
from .store import Write

#: The version of the records this code writes.
JSONL_VERSION = 1

#: UPGRADES[v] turns a record of version v into one of version v + 1 (none yet).
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

RowKey = tuple[str, str, datetime]


def encode(record: dict[str, Any]) -> bytes:
    """One record as one line (UTF-8, compact, no NaN: a ledger line is strict JSON)."""
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode() + b"\n"


def meta_record() -> dict[str, Any]:
    return {"type": "meta", "schema_version": JSONL_VERSION}


def write_record(write: Write, by: str) -> dict[str, Any]:
    return {
        "type": write.kind,
        "at": format_timestamp(write.at),
        "by": by,
        "row": write.row.to_json(),
    }


def instance_record(kind: str, by: str, at: datetime) -> dict[str, Any]:
    return {"type": kind, "at": format_timestamp(at), "by": by}


@dataclass
class Replay:
    """What a file says once read: every row's latest state and each writer's last sign."""

    rows: dict[RowKey, UsageRow] = field(default_factory=dict)
    updated_at: dict[RowKey, datetime] = field(default_factory=dict)
    last_seen: dict[str, datetime] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    bad_lines: int = 0

    def apply(self, record: dict[str, Any]) -> None:
        kind = record["type"]
        by = record["by"]
        at = parse_timestamp(record["at"])
        if kind in ("start", "checkpoint", "finish"):
            row = UsageRow.from_json(record["row"])
            key = row.row_key
            current = self.rows.get(key)
            if kind == "finish" or current is None or current.is_open:
                self.rows[key] = row
                self.updated_at[key] = at
            if row.instance == by:
                self.closed.discard(by)
        elif kind == "close":
            self.closed.add(by)
        elif kind != "heartbeat":
            raise ValueError(f"unknown record type {kind!r}")
        if kind == "heartbeat":
            self.closed.discard(by)
        previous = self.last_seen.get(by)
        self.last_seen[by] = at if previous is None else max(previous, at)

    def open_rows(self) -> list[UsageRow]:
        return [row for row in self.rows.values() if row.is_open]

    def crashed(self, row: UsageRow) -> UsageRow:
        """`row` closed as crashed with its last stored figures, ended when they were taken."""
        return replace(row, reason="crashed", ended_at=self.updated_at[row.row_key])


def check_header(first_line: bytes, name: str) -> int:
    """The schema version a file's first line declares. Raises LedgerError (one line) when
    it is not our meta record or declares a version newer than this code reads."""
    try:
        record = json.loads(first_line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("type") != "meta":
        raise LedgerError(f"{name} is not an sserelay JSON Lines ledger (no meta line)")
    version = record.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise LedgerError(f"{name}: unreadable schema_version {version!r}")
    if version > JSONL_VERSION:
        raise LedgerError(
            f"{name} has schema version {version}, newer than this sserelay reads "
            f"({JSONL_VERSION}); upgrade sserelay"
        )
    return version


def replay(lines: Iterable[bytes], name: str) -> Replay:
    """Read a whole file's lines. A line that is not a valid record (a torn write, a stray
    edit) is skipped and counted in `bad_lines`, so one bad line never hides the rest."""
    state = Replay()
    version: int | None = None
    for number, line in enumerate(lines):
        if number == 0:
            version = check_header(line, name)
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            if record.get("type") == "meta":
                version = check_header(line, name)
                continue
            assert version is not None
            for step in range(version, JSONL_VERSION):
                record = UPGRADES[step](record)
            state.apply(record)
        except (ValueError, KeyError, TypeError):
            state.bad_lines += 1
    return state
