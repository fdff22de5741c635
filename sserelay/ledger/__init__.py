"""The usage ledger: one row per billed unit, kept where a crash cannot take it.

    ledger = open_ledger("usage.db", instance=new_instance_id(), on_warning=warn)
    await ledger.open()                   # LedgerError: one line, before the relay listens
    await ledger.recover(dead_after=10)   # close dead instances' rows as `crashed`
    await ledger.start(row)               # when a stream starts
    await ledger.checkpoint(open_rows)    # every --checkpoint seconds, one transaction
    await ledger.finish(ended_row)        # final figures, reason, ended_at
    await ledger.heartbeat()              # every second or so: this instance is alive
    report = await ledger.close()         # LedgerCloseReport: unwritten rows, fallback file

Backends: SQLite (a path; the default), PostgreSQL (a `postgresql://` URL, the extra
`sserelay[postgres]`), JSON Lines (a path ending in `.jsonl`). See `queued.py` for what
happens when the storage is lost mid-run.
"""

from __future__ import annotations

from pathlib import Path

from sserelay.metering.meter import is_valid_request_id, new_request_id

from .base import (
    Ledger,
    LedgerCloseReport,
    Warn,
    default_state_dir,
    new_instance_id,
)
from .errors import LedgerError
from .jsonl import JSONLinesLedger
from .queued import QueuedLedger
from .row import UsageRow
from .sqlite import SQLiteLedger

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def default_ledger_path() -> Path:
    """`$XDG_STATE_HOME/sserelay/usage.db`, or `~/.local/state/sserelay/usage.db`."""
    return default_state_dir() / "usage.db"


def open_ledger(
    target: str | Path, *, instance: str | None, on_warning: Warn | None = None
) -> QueuedLedger:
    """The ledger for `target`, not yet opened (call `await ledger.open()`, or use it as an
    async context manager), so the caller can print `ledger.display` first.

    `postgresql://…` or `postgres://…` -> PostgreSQL; a path ending in `.jsonl` -> JSON
    Lines; any other path -> SQLite (`~` expanded; a writer creates the parent directories).
    `instance` None opens it to read only (`sserelay usage`). Raises LedgerError for an
    empty target, or a PostgreSQL URL without psycopg installed."""
    text = str(target)
    if not text.strip():
        raise LedgerError("the ledger target is empty")
    if text.startswith(POSTGRES_SCHEMES):
        from .postgres import PostgresLedger  # psycopg is optional: import it only when asked

        return PostgresLedger(text, instance=instance, on_warning=on_warning)
    path = Path(text).expanduser()
    if path.suffix == ".jsonl":
        return JSONLinesLedger(path, instance=instance, on_warning=on_warning)
    return SQLiteLedger(path, instance=instance, on_warning=on_warning)


__all__ = [
    "JSONLinesLedger",
    "Ledger",
    "LedgerCloseReport",
    "LedgerError",
    "QueuedLedger",
    "SQLiteLedger",
    "UsageRow",
    "default_ledger_path",
    "is_valid_request_id",
    "new_instance_id",
    "new_request_id",
    "open_ledger",
]
