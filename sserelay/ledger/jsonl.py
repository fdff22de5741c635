"""The JSON Lines ledger (a path ending in `.jsonl`): append-only, one record per line.

Records are in the format of `lines.py`; `query`, `spent` and `recover` read the whole
file back and replay it (the latest record of a row wins), so this backend suits small
ledgers, logs to ship elsewhere, and fallback files, not months of heavy traffic.

Each batch is one `os.write` on a file opened with O_APPEND: no user-space buffer (a record
is in the file the moment the call returns, so a `kill -9` loses nothing written), and
Linux keeps one process's append whole beside another's, so several processes may share a
file. No fsync: a power cut may lose the last writes, as with SQLite's synchronous=NORMAL.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, Unpack

from . import lines
from .base import Warn, utc_now
from .errors import LedgerError, one_line
from .queued import QueuedLedger, QueueOptions
from .row import UsageRow
from .schema import is_dead
from .store import FileStore, StoreUnavailable, Write, make_parents

T = TypeVar("T")


class JSONLinesStore(FileStore):
    """The `Store` over one JSON Lines file; file I/O runs in one worker thread."""

    def __init__(self, path: Path, warn: Warn) -> None:
        super().__init__(path)
        self._warn = warn
        self._fd: int | None = None
        self._instance: str | None = None

    def _append(self, records: Sequence[dict[str, Any]]) -> None:
        if self._fd is None:
            raise StoreUnavailable("the ledger is closed")
        try:
            data = memoryview(b"".join(lines.encode(record) for record in records))
        except ValueError as exc:  # rows are validated; one that was not stays queued
            raise StoreUnavailable(one_line(exc)) from exc
        try:
            while data:  # a regular file takes it whole unless the disk fills mid-way
                data = data[os.write(self._fd, data) :]
        except OSError as exc:
            raise StoreUnavailable(one_line(exc)) from exc

    def _lines(self) -> Iterator[bytes]:
        with open(self._path, "rb") as file:
            for line in file:
                if line.endswith(b"\n"):  # an unterminated last line is still being written
                    yield line

    def _replay(self) -> lines.Replay:
        try:
            state = lines.replay(self._lines(), str(self._path))
        except OSError as exc:
            raise StoreUnavailable(one_line(exc)) from exc
        if state.bad_lines:
            self._warn(f"ledger {self._path}: skipped {state.bad_lines} unreadable lines")
        return state

    # ------------------------------------------------------------------ open

    def _open(self, instance: str | None, at: datetime) -> None:
        where = f"cannot open ledger {self._path}"
        try:
            if instance is None:
                if not self._path.is_file() or self._path.stat().st_size == 0:
                    raise LedgerError(f"{where}: no ledger there")
                with open(self._path, "rb") as file:
                    lines.check_header(file.readline(), str(self._path))
                return
            make_parents(self._path)
            self._fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            self._instance = instance
            size = os.fstat(self._fd).st_size
            if size == 0:
                self._append([lines.meta_record()])
            else:
                with open(self._path, "rb") as file:
                    version = lines.check_header(file.readline(), str(self._path))
                    file.seek(size - 1)
                    if file.read(1) != b"\n":
                        # a torn last line (a crash mid-write): end it, so it is one bad
                        # line and not the head of ours
                        os.write(self._fd, b"\n")
                if version < lines.JSONL_VERSION:
                    self._append([lines.meta_record()])
            self._append([lines.instance_record("heartbeat", instance, at)])
            state = self._replay()
            stale = [state.crashed(row) for row in state.open_rows() if row.instance == instance]
            self._append_crashed(stale, state, instance)
        except OSError as exc:
            raise LedgerError(f"{where}: {one_line(exc)}") from exc
        except StoreUnavailable as exc:
            raise LedgerError(f"{where}: {exc}") from exc

    def _append_crashed(self, rows: Sequence[UsageRow], state: lines.Replay, by: str) -> None:
        if rows:
            self._append(
                [
                    lines.write_record(Write("finish", row, state.updated_at[row.row_key]), by)
                    for row in rows
                ]
            )

    # ------------------------------------------------------------------ writes

    async def write(self, batch: Sequence[Write]) -> None:
        by = self._writer()
        records = [lines.write_record(write, by) for write in batch]
        await self._run(lambda: self._append(records))

    async def ping(self) -> None:
        # a heartbeat: appending is the only honest test of a full disk
        record = lines.instance_record("heartbeat", self._writer(), utc_now())
        await self._run(lambda: self._append([record]))

    async def heartbeat(self, instance: str, at: datetime) -> None:
        record = lines.instance_record("heartbeat", instance, at)
        await self._run(lambda: self._append([record]))

    async def end_instance(self, instance: str, at: datetime) -> None:
        record = lines.instance_record("close", instance, at)
        await self._run(lambda: self._append([record]))

    async def recover(
        self, instance: str, dead_after: float, dead: Collection[str], at: datetime
    ) -> int:
        cutoff = at - timedelta(seconds=dead_after)

        def work() -> int:
            state = self._replay()
            closing: list[UsageRow] = []
            for row in state.open_rows():
                name = row.instance
                seen = state.last_seen.get(name)
                kind = None if seen is None else ("closed" if name in state.closed else "live")
                stale = None if seen is None else seen < cutoff
                if is_dead(name, kind, stale, instance, dead):
                    closing.append(state.crashed(row))
            self._append_crashed(closing, state, instance)
            return len(closing)

        return await self._run(work)

    def _writer(self) -> str:
        if self._instance is None:
            raise StoreUnavailable("the ledger was opened to read only")
        return self._instance

    # ------------------------------------------------------------------ reads

    async def query(self, since: datetime | None, until: datetime | None) -> list[UsageRow]:
        state = await self._run(self._replay)
        found = [
            row
            for row in state.rows.values()
            if (since is None or row.started_at >= since)
            and (until is None or row.started_at < until)
        ]
        found.sort(key=lambda row: (row.started_at, row.instance, row.id))
        return found

    async def spent(self, key: str | None, since: datetime | None) -> tuple[int, float]:
        state = await self._run(self._replay)
        tokens = 0
        cost = 0.0
        for row in state.rows.values():
            if row.key == key and (since is None or row.started_at >= since):
                tokens += row.tokens
                cost += row.cost or 0.0
        return tokens, cost

    async def close(self) -> None:
        def work() -> None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

        try:
            await self._run(work)
        finally:
            self._executor.shutdown(wait=True)


class JSONLinesLedger(QueuedLedger):
    """A ledger in one append-only JSON Lines file (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        instance: str | None,
        **options: Unpack[QueueOptions],
    ) -> None:
        super().__init__(
            JSONLinesStore(path, lambda message: self._warn(message)),
            instance=instance,
            **options,
        )
