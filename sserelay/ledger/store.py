"""What a ledger backend (SQLite, PostgreSQL, JSON Lines) does, under `QueuedLedger`.

A `Store` only talks to its storage; the queue in front of it (group commit, the bounded
outage queue, retries, the fallback file) is written once, in `queued.py`.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from .row import UsageRow

WriteKind = Literal["start", "checkpoint", "finish"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Write:
    """One row's newest state to store. `at` is when it was taken (the row's `updated_at`,
    which a crash recovery uses as the `ended_at` of a row it closes)."""

    kind: WriteKind
    row: UsageRow
    at: datetime

    @property
    def ends(self) -> bool:
        """A finish may overwrite an ended row (a crashed one coming back); a start or a
        checkpoint never reopens one."""
        return self.kind == "finish"


class StoreUnavailable(Exception):
    """The storage failed in a way that may pass (server lost, disk full, I/O error,
    locked too long): the queue keeps the writes and retries. The message is one line."""


class Store(Protocol):
    """One backend. Every method may raise StoreUnavailable once opened; `open` raises
    LedgerError instead (a ledger that cannot start must say so before the relay listens)."""

    @property
    def display(self) -> str:
        """The target, fit to print (a password masked)."""
        ...

    @property
    def fallback_dir(self) -> Path | None:
        """Where a fallback file for unwritten rows would go first, if there is a natural
        place (next to the file); None for a server."""
        ...

    async def open(self, instance: str | None, at: datetime) -> None:
        """Connect and migrate the schema. With an instance (a writer): register it as
        alive and close as `crashed` the rows an earlier life of the same id left open."""
        ...

    async def write(self, batch: Sequence[Write]) -> None:
        """Store every write of `batch` in ONE transaction (all or none)."""
        ...

    async def ping(self) -> None:
        """Succeed only if the storage is usable again (a retry with nothing queued)."""
        ...

    async def heartbeat(self, instance: str, at: datetime) -> None:
        """Record that `instance` is alive now."""
        ...

    async def recover(
        self, instance: str, dead_after: float, dead: Collection[str], at: datetime
    ) -> int:
        """Close as `crashed` the open rows of every other instance that is dead: its
        heartbeat is older than `dead_after` seconds, it ended, it never beat, or it is
        named in `dead`. Returns how many rows it closed."""
        ...

    async def end_instance(self, instance: str, at: datetime) -> None:
        """Record that `instance` closed cleanly."""
        ...

    async def query(self, since: datetime | None, until: datetime | None) -> list[UsageRow]:
        """Rows with since <= started_at < until, oldest first."""
        ...

    async def spent(self, key: str | None, since: datetime | None) -> tuple[int, float]:
        """(tokens, cost) summed over the rows of `key` started at or after `since`."""
        ...

    async def close(self) -> None:
        """Release the connection or file; never raises."""
        ...


def make_parents(path: Path) -> None:
    """Create the directories above `path`; a file in the way is named as such."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    path.parent.mkdir(parents=True, exist_ok=True)


class FileStore:
    """What a store kept in one file shares: its path (also what is shown, and where a
    fallback file goes) and one worker thread that does all of its file I/O, in order, so
    the event loop never waits on a disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sserelay-ledger")

    @property
    def path(self) -> Path:
        return self._path

    @property
    def display(self) -> str:
        return str(self._path)

    @property
    def fallback_dir(self) -> Path | None:
        return self._path.parent

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self, instance: str | None, at: datetime) -> None:
        """Open the file in the worker thread (`_open`); closed again if that fails."""
        try:
            await self._run(lambda: self._open(instance, at))
        except BaseException:
            await self.close()
            raise

    def _open(self, instance: str | None, at: datetime) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
