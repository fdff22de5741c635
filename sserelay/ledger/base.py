"""`Ledger`, the protocol every backend offers, and what they share: the close report,
instance ids, the clock and the state directory. `queued.py` has the one write path.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from .row import UsageRow

Warn = Callable[[str], None]
Clock = Callable[[], datetime]

#: Rows kept in memory while the store is unavailable, before finished ones are spilled.
MAX_QUEUED = 100_000


def new_instance_id() -> str:
    """An id for this process's ledger writer: `HOST-PID-RANDOM`, unique among live
    processes (the random part keeps a reused pid apart from its predecessor)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/sserelay`, or `~/.local/state/sserelay` when that is unset or empty."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sserelay"


@dataclass(frozen=True, slots=True)
class LedgerCloseReport:
    """What `close()` could not do cleanly.

    `unwritten`: rows the store never took; they are in `fallback_path` (a JSON Lines
    ledger). If that file could not be written (or not all of it), `error` says why and
    the rows it lacks are lost: the caller must say so. `left_open`: rows started
    and never finished; they stay open in the store until a `recover()` closes them as
    `crashed`."""

    unwritten: int = 0
    fallback_path: Path | None = None
    error: str | None = None
    left_open: int = 0

    @property
    def clean(self) -> bool:
        """True when every row was stored and none was left open."""
        return self.unwritten == 0 and self.left_open == 0


class Ledger(Protocol):
    """Where usage rows live. Open it, write rows as requests start, run and end, close it.

    Rows are keyed by (instance, id, started_at): `id` alone is not unique (a client may
    send, and reuse, its own `x-request-id`) and neither is (instance, id) (a retry that
    reuses its id is a second row). Within one ledger, two rows open at once must differ
    in that key; `start` refuses a duplicate.
    """

    @property
    def display(self) -> str:
        """The target, fit to print: a path, or a URL with its password masked."""
        ...

    @property
    def instance(self) -> str | None:
        """The writer's instance id; None for a ledger opened to read only."""
        ...

    async def open(self) -> None: ...
    async def start(self, row: UsageRow) -> None: ...
    async def checkpoint(self, rows: Iterable[UsageRow]) -> None: ...
    async def finish(self, row: UsageRow) -> None: ...
    async def heartbeat(self) -> None: ...
    async def recover(self, dead_after: float, *, dead: Collection[str] = ()) -> int: ...
    async def query(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[UsageRow]: ...
    async def spent(self, key: str | None, since: datetime | None = None) -> tuple[int, float]: ...
    async def close(self) -> LedgerCloseReport: ...
