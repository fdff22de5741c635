"""`QueuedLedger`, the one implementation of the `Ledger` write path, in front of any `Store`.

The write path, in one place for all backends:

- **Group commit.** `start`, `checkpoint` and `finish` put the row's newest state in an
  ordered pending map (one entry per row, so a row written twice while queued is written
  once) and wait for a flush, which writes *everything* pending in ONE transaction. Under
  load the calls that arrive while a transaction runs share the next one; alone, a call
  costs one transaction and returns once its row is stored.
- **Outages.** When the store fails (server lost, disk full, I/O error) the writes stay
  pending, `on_warning` is told once, calls return at once, and a retry task tries again
  with exponential backoff; when a retry succeeds `on_warning` is told once more. If more
  than `max_queued` rows wait, the finished ones (which will never change again) are moved
  to the fallback file, so memory stays bounded and nothing is dropped.
- **Close.** One last attempt; whatever is still unwritten is appended to a JSON Lines
  fallback file (readable as a ledger itself) and `close()` says how many rows and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self, TypedDict

from . import lines
from .base import MAX_QUEUED, Clock, LedgerCloseReport, Warn, default_state_dir, utc_now
from .errors import LedgerError, one_line
from .row import UsageRow
from .store import Store, StoreUnavailable, Write, WriteKind

_log = logging.getLogger("sserelay.ledger")


class QueueOptions(TypedDict, total=False):
    """How a `QueuedLedger` queues, retries and spills; every backend takes the same."""

    on_warning: Warn | None
    max_queued: int
    retry: tuple[float, float]
    fallback_dir: Path | None
    clock: Clock


class QueuedLedger:
    """A `Ledger` over a `Store`: see the module docstring for the write path.

    `instance` None opens the ledger to read (`query`, `spent`) without registering a
    writer; the write methods then raise LedgerError. `on_warning` gets one line per change
    of state (store lost, store back, rows spilled, bad lines skipped); by default they go
    to the `sserelay.ledger` logger. `retry` is (first delay, longest delay) in seconds.
    """

    def __init__(
        self,
        store: Store,
        *,
        instance: str | None,
        on_warning: Warn | None = None,
        max_queued: int = MAX_QUEUED,
        retry: tuple[float, float] = (0.05, 2.0),
        fallback_dir: Path | None = None,
        clock: Clock = utc_now,
    ) -> None:
        if instance is not None and not instance:
            raise ValueError("instance must not be empty")
        self._store = store
        self._instance = instance
        self._warn: Warn = on_warning if on_warning is not None else _log.warning
        self._max_queued = max_queued
        self._retry_delays = retry
        self._fallback_dir = fallback_dir
        self._clock = clock
        self._opened = False
        self._closed = False
        self._open_rows: set[tuple[str, str, datetime]] = set()
        self._pending: dict[tuple[str, str, datetime], Write] = {}
        self._lock = asyncio.Lock()
        self._spill_lock = asyncio.Lock()
        self._down: str | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._fallback_path: Path | None = None
        self._fallback_rows = 0
        self._fallback_error: str | None = None
        self._lost_rows = 0

    # ------------------------------------------------------------------ properties

    @property
    def display(self) -> str:
        return self._store.display

    @property
    def instance(self) -> str | None:
        return self._instance

    @property
    def available(self) -> bool:
        """False while the store is lost and writes wait in memory."""
        return self._down is None

    @property
    def queued(self) -> int:
        """Rows waiting to be written (their newest state each)."""
        return len(self._pending)

    # ------------------------------------------------------------------ life

    async def open(self) -> None:
        """Connect, create or migrate the schema, and (for a writer) register the instance
        and close as `crashed` the rows an earlier life of the same instance id left open.
        Raises LedgerError (one line) when the ledger cannot be used."""
        if self._opened:
            raise LedgerError(f"ledger {self.display} is already open")
        await self._store.open(self._instance, self._clock())
        self._opened = True

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> LedgerCloseReport:
        """Write what is pending (one last try), put what cannot be written in the fallback
        file, mark the instance ended, release the store. Safe to call twice."""
        if self._closed or not self._opened:
            self._closed = True
            return LedgerCloseReport()
        self._closed = True
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_task
            self._retry_task = None
        async with self._lock:
            try:
                if self._pending:
                    try:
                        await self._store.write(list(self._pending.values()))
                        self._pending.clear()
                        self._down = None
                    except StoreUnavailable as exc:
                        self._down = str(exc)
                async with self._spill_lock:  # after any spill under way, and its put-back
                    if self._pending:
                        unwritten = list(self._pending.values())
                        self._pending.clear()
                        spilled = await self._spill(unwritten)
                        self._lost_rows += len(unwritten) - len(spilled)
                if self._instance is not None and self._down is None:
                    with contextlib.suppress(StoreUnavailable):
                        await self._store.end_instance(self._instance, self._clock())
            finally:
                await self._store.close()
        return LedgerCloseReport(
            unwritten=self._fallback_rows + self._lost_rows,
            fallback_path=self._fallback_path,
            error=self._fallback_error,
            left_open=len(self._open_rows),
        )

    # ------------------------------------------------------------------ writes

    async def start(self, row: UsageRow) -> None:
        """Store a row whose stream starts. Returns once it is stored, or queued while the
        store is lost. Raises LedgerError for a row already open here (same key)."""
        self._check_writer(row)
        if not row.is_open:
            raise ValueError("start() takes an open row (no reason, no ended_at)")
        key = row.row_key
        if key in self._open_rows:
            raise LedgerError(f"request {row.id!r} started at {row.started_at} is already open")
        self._open_rows.add(key)
        self._enqueue("start", row)
        await self._flush()

    async def checkpoint(self, rows: Iterable[UsageRow]) -> None:
        """Store the figures so far of many open rows in ONE transaction. A row this ledger
        has not started, or has already finished, is skipped: a checkpoint gathered just
        before a finish must never reopen (or duplicate) the row."""
        taken = 0
        for row in rows:
            self._check_writer(row)
            if row.is_open and row.row_key in self._open_rows:
                self._enqueue("checkpoint", row)
                taken += 1
        if taken:
            await self._flush()

    async def finish(self, row: UsageRow) -> None:
        """Store a row's final figures, `reason` and `ended_at`. A row that was never
        started here (a request refused before it streamed) is stored whole. Calling it
        twice for one request would store the second figures over the first."""
        self._check_writer(row)
        if row.is_open:
            raise ValueError("finish() takes an ended row (reason and ended_at set)")
        self._open_rows.discard(row.row_key)
        self._enqueue("finish", row)
        await self._flush()

    async def heartbeat(self) -> None:
        """Record that this instance is alive. Skipped while the store is lost (the retry
        task is already probing it); a failure starts the outage like a failed write."""
        self._check_writer(None)
        if self._down is not None:
            return
        async with self._lock:
            if self._down is not None:
                return
            try:
                await self._store.heartbeat(self._instance_id, self._clock())
            except StoreUnavailable as exc:
                self._lost(exc)

    async def recover(self, dead_after: float, *, dead: Collection[str] = ()) -> int:
        """Close as `crashed`, with their last stored figures and `ended_at` = when those
        were stored, the open rows of every other instance that is dead: its heartbeat is
        older than `dead_after` seconds, it closed, it never beat, or it is named in
        `dead`. This instance's own rows are never touched. Returns how many were closed.
        Raises LedgerError while the store is lost."""
        self._check_writer(None)
        if dead_after < 0:
            raise ValueError("dead_after must be >= 0")
        async with self._lock:
            self._check_available()
            try:
                return await self._store.recover(
                    self._instance_id, dead_after, frozenset(dead), self._clock()
                )
            except StoreUnavailable as exc:
                self._lost(exc)
                raise LedgerError(f"ledger {self.display} is unavailable: {exc}") from exc

    # ------------------------------------------------------------------ reads

    async def query(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[UsageRow]:
        """Stored rows with since <= started_at < until (None: unbounded), oldest first.
        Open rows come with their last checkpoint; rows still queued are not included.
        Raises LedgerError while the store is lost."""
        self._check_opened()
        async with self._lock:
            self._check_available()
            try:
                return await self._store.query(since, until)
            except StoreUnavailable as exc:
                self._lost(exc)
                raise LedgerError(f"ledger {self.display} is unavailable: {exc}") from exc

    async def spent(self, key: str | None, since: datetime | None = None) -> tuple[int, float]:
        """(tokens, cost) of the stored rows of `key` (None: rows without a key) started at
        or after `since`: open rows count with their last checkpoint, unpriced rows add no
        cost. Raises LedgerError while the store is lost."""
        self._check_opened()
        async with self._lock:
            self._check_available()
            try:
                return await self._store.spent(key, since)
            except StoreUnavailable as exc:
                self._lost(exc)
                raise LedgerError(f"ledger {self.display} is unavailable: {exc}") from exc

    # ------------------------------------------------------------------ the queue

    @property
    def _instance_id(self) -> str:
        assert self._instance is not None
        return self._instance

    def _check_opened(self) -> None:
        if not self._opened or self._closed:
            raise LedgerError(f"ledger {self.display} is not open")

    def _check_available(self) -> None:
        if self._down is not None:
            raise LedgerError(f"ledger {self.display} is unavailable: {self._down}")

    def _check_writer(self, row: UsageRow | None) -> None:
        self._check_opened()
        if self._instance is None:
            raise LedgerError(f"ledger {self.display} was opened to read only")
        if row is not None and row.instance != self._instance:
            raise ValueError(f"row of instance {row.instance!r} given to {self._instance!r}")

    def _enqueue(self, kind: WriteKind, row: UsageRow) -> None:
        key = row.row_key
        queued = self._pending.get(key)
        if kind == "checkpoint" and queued is not None and queued.kind == "start":
            kind = "start"  # the start was never stored: this write still is the start
        # assigning to an existing key keeps its place: a row's order among others is
        # the order it was first queued in, so an earlier row with the same id is written
        # (and finished) first
        self._pending[key] = Write(kind, row, self._clock())

    async def _flush(self) -> None:
        if self._down is not None:
            await self._bound_queue()
            return
        async with self._lock:
            if self._down is not None or not self._pending:
                return
            # everything pending at this moment, in one transaction: the callers waiting
            # on the lock find their rows written and return without one of their own
            batch = list(self._pending.values())
            try:
                await self._store.write(batch)
            except StoreUnavailable as exc:
                self._lost(exc)
                return
            self._forget(batch)

    def _forget(self, batch: Sequence[Write]) -> None:
        for write in batch:
            key = write.row.row_key
            if self._pending.get(key) is write:  # not replaced by a newer state meanwhile
                del self._pending[key]

    def _lost(self, exc: StoreUnavailable) -> None:
        if self._down is None:
            self._warn(
                f"ledger {self.display} unavailable: {exc}; keeping rows in memory and retrying"
            )
        self._down = str(exc)
        if self._retry_task is None and not self._closed:
            self._retry_task = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay, longest = self._retry_delays
        try:
            while True:
                await asyncio.sleep(delay)
                async with self._lock:
                    written = 0
                    try:
                        if not self._pending:
                            await self._store.ping()
                        # rows may be queued while a batch is written: go on until none wait
                        while self._pending:
                            batch = list(self._pending.values())
                            await self._store.write(batch)
                            self._forget(batch)
                            written += len(batch)
                    except StoreUnavailable as exc:
                        self._down = str(exc)
                        delay = min(delay * 2, longest)
                        continue
                    self._down = None
                    spilled = (
                        f"; {self._fallback_rows} rows remain in {self._fallback_path}"
                        if self._fallback_path is not None
                        else ""
                    )
                    self._warn(f"ledger {self.display} is back: {written} rows written{spilled}")
                    return
        finally:
            if self._retry_task is asyncio.current_task():
                self._retry_task = None

    async def _bound_queue(self) -> None:
        """While lost: past `max_queued` rows, move the finished ones (oldest first) to the
        fallback file. Open rows stay: there are only as many as streams running now."""
        if len(self._pending) <= self._max_queued:
            return
        async with self._spill_lock:
            finished = [write for write in self._pending.values() if write.ends]
            if len(self._pending) <= self._max_queued or not finished:
                return  # another caller spilled while this one waited
            first = self._fallback_path is None
            # out of the queue before the await: the retry task must not also write them
            for write in finished:
                del self._pending[write.row.row_key]
            if not await self._spill(finished):
                for write in finished:  # back in, for close() to try once more
                    self._pending.setdefault(write.row.row_key, write)
        if first and self._fallback_path is not None:
            self._warn(
                f"ledger {self.display}: more than {self._max_queued} rows waiting; "
                f"finished rows are going to {self._fallback_path}"
            )

    async def _spill(self, writes: Sequence[Write]) -> Sequence[Write]:
        """Append `writes` to the fallback file (made on first use, in the store's own
        directory, else the state directory, else the temp directory). Returns the writes
        stored; on failure none, with the reason kept for the close report. Callers hold
        `_spill_lock`: one file, made once, appended to in turn."""
        by = self._instance or "reader"
        data = b"".join(lines.encode(lines.write_record(write, by)) for write in writes)
        try:
            path = await asyncio.to_thread(self._append_fallback, data)
        except OSError as exc:
            self._fallback_error = f"cannot write a fallback file: {one_line(exc)}"
            return ()
        self._fallback_path = path
        self._fallback_rows += len(writes)
        return writes

    def _append_fallback(self, data: bytes) -> Path:
        if self._fallback_path is not None:
            with open(self._fallback_path, "ab") as file:
                file.write(data)
            return self._fallback_path
        stamp = self._clock().strftime("%Y%m%dT%H%M%SZ")
        # the random part: two ledgers of one instance id closing in the same second
        name = (
            f"sserelay-unwritten-{self._instance or 'reader'}-{stamp}-{secrets.token_hex(2)}.jsonl"
        )
        candidates = [
            self._fallback_dir,
            self._store.fallback_dir,
            default_state_dir(),
            Path(tempfile.gettempdir()),
        ]
        failure: OSError | None = None
        for directory in candidates:
            if directory is None:
                continue
            path = directory / name
            try:
                directory.mkdir(parents=True, exist_ok=True)
                with open(path, "xb") as file:
                    try:
                        file.write(lines.encode(lines.meta_record()) + data)
                        file.flush()
                    except OSError:
                        path.unlink()  # a half-written file would be a second, partial copy
                        raise
                return path
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure
