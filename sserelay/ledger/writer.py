"""`LedgerWriter`: the ledger's subscriber to the meter's observer hook.

A client's row is written when it opens, checkpointed with its figures so far every
`checkpoint` seconds while it streams (all open rows in one transaction, and only those
that changed), and finished with its final figures when the meter closes it. The writes
run in tasks of their own: nothing here is on the per-event path, and a slow or lost
store never holds a stream up (the ledger queues, retries and spills; see queued.py).
Each checkpoint also beats this instance's heartbeat, by which another instance knows it
is alive (and, once it is not, closes its open rows as `crashed`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from sserelay.metering.bill import ClientBill
from sserelay.metering.meter import ClientMeter, MeterObserver
from sserelay.metering.usage import Usage

from .base import LedgerCloseReport
from .errors import LedgerError
from .queued import QueuedLedger
from .row import UsageRow

#: The cost of an open client's figures so far (the run's pricing).
PriceOf = Callable[[ClientMeter], "float | None"]


#: Open rows built per turn of the event loop at a checkpoint (about 1 ms of work).
SLICE = 100


def _moment(wall: float, offset: float = 0.0) -> datetime:
    return datetime.fromtimestamp(wall, UTC) + timedelta(seconds=offset)


def _reported(usage: Usage | None) -> tuple[int | None, int | None, int | None]:
    """(input, output, cached) tokens as reported; None for what was not."""
    if usage is None:
        return None, None, None
    return usage.input_tokens, usage.output_tokens, getattr(usage, "cached_tokens", None)


def _source(usage: Usage | None) -> str:
    return "metered" if usage is None or usage.empty else "reported"


class LedgerWriter(MeterObserver):
    """Writes every client's row to `ledger` (an opened QueuedLedger) from the meter's hook."""

    def __init__(
        self,
        ledger: QueuedLedger,
        *,
        instance: str,
        tokenizer: str,
        checkpoint: float,
        price_of: PriceOf,
        on_warning: Callable[[str], None],
        dead_after: float,
    ) -> None:
        self._ledger = ledger
        self._instance = instance
        self._tokenizer = tokenizer
        self._interval = checkpoint
        self._price_of = price_of
        self._warn = on_warning
        self._open: dict[int, ClientMeter] = {}
        self._seen: dict[int, tuple[int, int, int]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._dead_after = dead_after
        self.rows = 0
        #: rows of dead instances this writer closed as `crashed` while it ran
        self.recovered = 0

    @property
    def display(self) -> str:
        return self._ledger.display

    # ------------------------------------------------------------------ the observer hook

    def opened(self, client: ClientMeter) -> None:
        self._open[client.id] = client
        self._seen[client.id] = (0, 0, 0)
        self._spawn(self._ledger.start(self._open_row(client)))

    def closed(self, bill: ClientBill) -> None:
        self._open.pop(bill.id, None)
        self._seen.pop(bill.id, None)
        self.rows += 1
        self._spawn(self._ledger.finish(self._final_row(bill)))

    # ------------------------------------------------------------------ the life cycle

    def start(self) -> None:
        """Begin checkpointing and beating the heartbeat."""
        self._ticker = asyncio.create_task(self._tick())

    async def aclose(self) -> LedgerCloseReport:
        """Wait for every row written so far, then close the ledger; what it could not
        store is in the report (and its fallback file)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._writes:
            await asyncio.wait(set(self._writes))
        return await self._ledger.close()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_recovery = loop.time() + self._dead_after
        while True:
            await asyncio.sleep(self._interval)
            changed = await self._changed_rows()
            try:
                if changed:
                    await self._ledger.checkpoint(changed)
                await self._ledger.heartbeat()
                if loop.time() >= next_recovery and self._ledger.available:
                    # A survivor closes the rows of an instance that died meanwhile.
                    next_recovery = loop.time() + self._dead_after
                    self.recovered += await self._ledger.recover(self._dead_after)
            except LedgerError as exc:  # the queue keeps what it cannot store; say why once
                self._warn(str(exc))

    async def _changed_rows(self) -> list[UsageRow]:
        """The open rows whose figures moved since the last checkpoint, built SLICE at a time
        with the loop let go between slices: 1,000 rows at once held every stream up for
        about 11 ms (a row closed meanwhile is skipped by the ledger, never reopened)."""
        rows: list[UsageRow] = []
        for done, client in enumerate(list(self._open.values()), 1):
            if self._changed(client):
                rows.append(self._open_row(client))
            if done % SLICE == 0:
                await asyncio.sleep(0)
        return rows

    def _changed(self, client: ClientMeter) -> bool:
        figures = (client.billed_tokens, client.events, client.bytes)
        if self._seen.get(client.id) == figures:
            return False
        self._seen[client.id] = figures
        return True

    def _spawn(self, write: Awaitable[None]) -> None:
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # A row the ledger refused (not one it queued: those are kept): say so, once each.
            self._warn(f"ledger {self.display}: a row was not written: {error}")

    # ------------------------------------------------------------------ rows

    def _open_row(self, client: ClientMeter) -> UsageRow:
        request = client.request
        first = client.first_event_at
        reported = _reported(client.upstream_usage)
        return UsageRow(
            id=client.request_id,
            instance=self._instance,
            started_at=_moment(client.started_wall),
            first_token_at=(
                None if first is None else _moment(client.started_wall, first - client.opened_at)
            ),
            client=client.peer or "-",
            key=client.key,
            method=request.method if request is not None else "GET",
            path=request.path if request is not None else "/",
            model=client.model,
            status=request.status if request is not None else 200,
            tokens=client.billed_tokens,
            events=client.events,
            bytes=client.bytes,
            tokenizer=self._tokenizer,
            usage_source=_source(client.upstream_usage),
            cost=self._price_of(client),
            last_event_id=client.last_event_id,
            input_tokens=reported[0],
            output_tokens=reported[1],
            cached_tokens=reported[2],
        )

    def _final_row(self, bill: ClientBill) -> UsageRow:
        request = bill.request
        first = bill.time_to_first_event_s
        reported = _reported(bill.upstream_usage)
        return UsageRow(
            id=bill.request_id,
            instance=self._instance,
            started_at=_moment(bill.started_wall),
            first_token_at=None if first is None else _moment(bill.started_wall, first),
            ended_at=_moment(bill.started_wall, bill.duration_s),
            client=bill.peer or "-",
            key=bill.key,
            method=request.method if request is not None else "GET",
            path=request.path if request is not None else "/",
            model=bill.model,
            status=request.status if request is not None else 200,
            reason=str(bill.reason),
            tokens=bill.tokens,
            events=bill.events,
            bytes=bill.bytes,
            tokenizer=self._tokenizer,
            usage_source=_source(bill.upstream_usage),
            cost=bill.cost,
            last_event_id=bill.last_event_id,
            input_tokens=reported[0],
            output_tokens=reported[1],
            cached_tokens=reported[2],
        )
