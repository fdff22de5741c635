"""The broadcast hub: one source, read once, served to every client that connects.

One reader task reads the source only while some client is waiting for more,
so the source goes at the pace of the fastest client and is paused, not
drained, while nobody listens. Each batch it reads is encoded once into an
EventLog; every client (a Listener) takes from that log at its own cursor, so
all clients share the same bytes and a client that connects late, or resumes
after `Last-Event-ID`, gets exactly the events after its point: no gap, no
duplicate. A client more than `max_lag` events behind the newest event when
more is read is cut off (its `on_cut` is called), so a client that stops
reading never holds back the others and the log stays bounded: it keeps the
last `history` events and whatever a connected client has yet to take.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from sserelay.errors import SourceError
from sserelay.sources.pacing import Counted, Pacer, paced
from sserelay.sources.text import Source, TimedBatch
from sserelay.wire.frames import Frames
from sserelay.wire.sse import encode_batch

#: Sent to a client whose starting point has already been dropped from the history.
HISTORY_TRUNCATED = b": history truncated\n\n"

DEFAULT_HISTORY = 10_000
DEFAULT_MAX_LAG = 10_000


@dataclass(frozen=True, slots=True)
class Batch:
    """Events `first`... that were published together: one shared payload,
    with each event's end offset and the running total of tokens, so any
    tail of the batch can be sent and billed exactly."""

    first: int
    payload: bytes
    ends: tuple[int, ...]
    token_totals: tuple[int, ...]
    #: what the token count holds back after the batch's last event (Frames.pending)
    pending: int = 0
    #: the whole batch, made once: what every client that keeps up is given
    whole: Frames = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        whole = Frames(self.payload, self.events, self.tokens, self.pending)
        object.__setattr__(self, "whole", whole)

    @property
    def events(self) -> int:
        return len(self.ends)

    @property
    def tokens(self) -> int:
        return self.token_totals[-1]

    @property
    def next(self) -> int:
        """The id after this batch's last event."""
        return self.first + len(self.ends)

    def tail(self, start: int) -> Frames:
        """Events `start`... of this batch."""
        skip = start - self.first
        if skip == 0:
            return self.whole
        offset = self.ends[skip - 1]
        return Frames(
            self.payload[offset:],
            self.events - skip,
            self.tokens - self.token_totals[skip - 1],
            self.pending,
        )


def parse_event_id(value: str | None) -> int | None:
    """A `Last-Event-ID` as one of our sequence numbers; None for anything else."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


class EventLog:
    """Every event published, numbered from 1, for as long as anyone may need it.

    `head` is the id the next event will get. `trim(floor)` drops what is older
    than both the last `history` events and `floor` (the oldest event a
    connected client still has to take); whole batches are dropped, so a little
    more than `history` may be kept. Sans-IO: no event loop involved."""

    def __init__(self, history: int = DEFAULT_HISTORY, *, ids: bool = True) -> None:
        if history < 0:
            raise ValueError("history must not be negative")
        self.history = history
        self.ids = ids
        self.head = 1
        self._batches: deque[Batch] = deque()

    @property
    def oldest(self) -> int:
        """The id of the oldest event kept (`head` when none is)."""
        return self._batches[0].first if self._batches else self.head

    @property
    def kept(self) -> int:
        return self.head - self.oldest

    def append(self, chunks: Sequence[str], tokens: Sequence[int], pending: int = 0) -> Batch:
        """Publish `chunks` (with their token counts, and what the count holds back after
        the last of them) as the next events."""
        first = self.head
        payload, ends = encode_batch(chunks, first if self.ids else None)
        batch = Batch(first, payload, ends, tuple(accumulate(tokens)), pending)
        self._batches.append(batch)
        self.head = batch.next
        return batch

    def start(self, last_event_id: int | None) -> tuple[int, bool]:
        """Where a client that has seen up to `last_event_id` (None: nothing)
        starts, and whether events it should have got were already dropped.
        An id this stream never sent counts as nothing seen."""
        wanted = 1
        if last_event_id is not None and last_event_id < self.head:
            wanted = last_event_id + 1
        if wanted < self.oldest:
            return self.oldest, True
        return wanted, False

    def read(self, cursor: int) -> Frames | None:
        """Every event from `cursor` on, in one Frames (None if there is none yet).
        A client that is keeping up gets the batch's own payload, not a copy."""
        if cursor >= self.head:
            return None
        if cursor < self.oldest:
            raise ValueError(f"event {cursor} is no longer kept")
        newest = self._batches[-1]
        if newest.first <= cursor:  # a client keeping up: no search
            return newest.tail(cursor)
        index = bisect.bisect_right(self._batches, cursor, key=lambda b: b.first) - 1
        parts = [self._batches[index].tail(cursor)]
        parts += [
            self._batches[i].tail(self._batches[i].first)
            for i in range(index + 1, len(self._batches))
        ]
        return Frames(
            b"".join(p.payload for p in parts),
            sum(p.events for p in parts),
            sum(p.tokens for p in parts),
            parts[-1].pending,
        )

    def trim(self, floor: int) -> None:
        keep_from = min(floor, self.head - self.history)
        while self._batches and self._batches[0].next <= keep_from:
            self._batches.popleft()


class Listener:
    """One client's place in the hub: an async iterator of the Frames to send it.

    It ends when the stream has ended and everything was taken, raises
    SourceError when the source failed, and ends at once when the hub cut it
    off (`cut` is then true). `aclose()` leaves the hub."""

    def __init__(self, hub: Hub, cursor: int, truncated: bool, on_cut: Callable[[], None]) -> None:
        self._hub = hub
        self.cursor = cursor
        self.truncated = truncated
        self.cut = False
        self._on_cut = on_cut
        self._took = False  # has taken events: at the end, it has the last one

    def __aiter__(self) -> AsyncIterator[Frames]:
        return self

    async def __anext__(self) -> Frames:
        hub = self._hub
        while True:
            if self.cut:
                raise StopAsyncIteration
            frames = hub.log.read(self.cursor)
            if frames is not None:
                self.cursor = hub.log.head
                self._took = True
                if self.truncated:
                    self.truncated = False
                    return Frames(
                        HISTORY_TRUNCATED + frames.payload,
                        frames.events,
                        frames.tokens,
                        frames.pending,
                    )
                return frames
            if self.truncated:  # say so now, not with the next event
                self.truncated = False
                return Frames(HISTORY_TRUNCATED, 0, 0)
            if hub.error is not None:
                raise SourceError(hub.error)
            if hub.ended:
                if self._took and hub.end_tokens:
                    # The last event's bytes are out; the tokens counted at the end go with them.
                    self._took = False
                    return Frames(b"", 0, hub.end_tokens)
                raise StopAsyncIteration
            await hub.wait_for_more(self)

    @property
    def lag(self) -> int:
        """Events published that this client has not taken yet."""
        return self._hub.log.head - self.cursor

    async def aclose(self) -> None:
        self._hub.leave(self)

    def _cut_off(self) -> None:
        self.cut = True
        self._on_cut()


class Hub:
    """One source, many listeners. `join()` a listener per client; `aclose()`
    stops the reader and closes the source.

    `count` gives each chunk's tokens, in order (a TokenCounter's `feed`
    counts over the joined text), and `pending`, if given, what it then holds
    back (a BPE count's open tail, billed to a client that leaves there).
    `count_end`, called once when the source ends, gives the tokens `count`
    could not know until then (a last NDJSON line with no line end, a BPE
    count's tail): they are `end_tokens`, billed with no bytes to every
    listener that took the last event.
    `pacer` spaces events out (`--rate`, `--delay`, `--realtime`). `clock`
    and `sleep` are injected for tests."""

    def __init__(
        self,
        source: Source,
        *,
        count: Callable[[str], int],
        count_end: Callable[[], int] | None = None,
        pending: Callable[[], int] | None = None,
        ids: bool = True,
        history: int = DEFAULT_HISTORY,
        max_lag: int = DEFAULT_MAX_LAG,
        pacer: Pacer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_lag < 1:
            raise ValueError("max_lag must be at least 1")
        self.source = source
        self.log = EventLog(history, ids=ids)
        self.max_lag = max_lag
        self.ended = False
        self.error: str | None = None
        self.end_tokens = 0
        self._count = count
        self._count_end = count_end
        self._pending = pending
        self._pacer = pacer if pacer is not None and pacer.active else None
        self._clock = clock
        self._sleep = sleep
        self._listeners: set[Listener] = set()
        self._waiting: set[Listener] = set()
        self._demand = asyncio.Event()  # some listener has taken everything and waits
        self._published = asyncio.Event()  # replaced at each publish
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def join(
        self, last_event_id: str | None = None, on_cut: Callable[[], None] = lambda: None
    ) -> Listener:
        """A listener that starts right after `last_event_id` (a `Last-Event-ID`
        value), or at the first event kept when there is none. `on_cut` is
        called if it falls more than `max_lag` events behind."""
        self.log.trim(self._floor())  # what others took since the last publish may go now
        cursor, truncated = self.log.start(parse_event_id(last_event_id))
        listener = Listener(self, cursor, truncated, on_cut)
        self._listeners.add(listener)
        return listener

    def has_everything(self, last_event_id: str | None) -> bool:
        """Whether the stream has ended and a client that saw `last_event_id`
        already has all of it (it can be told so instead of being served)."""
        seen = parse_event_id(last_event_id)
        return self.ended and self.error is None and seen is not None and seen + 1 == self.log.head

    def leave(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._unwait(listener)
        self.log.trim(self._floor())

    async def wait_for_more(self, listener: Listener) -> None:
        """Wait until something is published (or the stream ends), asking the reader for it."""
        published = self._published
        self._waiting.add(listener)
        self._demand.set()
        if self._reader is None and not self._closed:
            self._reader = asyncio.create_task(self._read())
        try:
            await published.wait()
        finally:
            self._unwait(listener)

    def stop(self) -> None:
        """Stop reading the source now (aclose() waits until it is closed)."""
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()

    async def aclose(self) -> None:
        self.stop()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def _unwait(self, listener: Listener) -> None:
        self._waiting.discard(listener)
        if not self._waiting:
            self._demand.clear()

    def _floor(self) -> int:
        return min((listener.cursor for listener in self._listeners), default=self.log.head)

    async def _read(self) -> None:
        batches = self._counted()
        try:
            async for chunks, tokens, pending in paced(
                batches, self._pacer, ready=self._demand.wait, clock=self._clock, sleep=self._sleep
            ):
                self._publish(chunks, tokens, pending)
            if self._count_end is not None:
                self.end_tokens = self._count_end()
            self._end(None)
        except SourceError as exc:
            self._end(str(exc))
        finally:
            await batches.aclose()

    async def _counted(self) -> AsyncGenerator[Counted, None]:
        """The source's batches with each chunk's tokens, read only while a listener waits."""
        batches = aiter(self.source.batches())
        try:
            while True:
                await self._demand.wait()
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return
                at = None
                if isinstance(batch, TimedBatch):
                    at, batch = batch.at, batch.chunks
                if not batch:
                    continue
                if self._pending is None:
                    yield batch, [self._count(chunk) for chunk in batch], at, ()
                else:  # a BPE count: what it holds back after each chunk, too
                    tokens, pendings = [], []
                    for chunk in batch:
                        tokens.append(self._count(chunk))
                        pendings.append(self._pending())
                    yield batch, tokens, at, pendings
        finally:
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                await aclose()

    def _publish(self, chunks: Sequence[str], tokens: Sequence[int], pending: int = 0) -> None:
        # Lag is counted before this batch: one big read never cuts a client
        # that had taken everything before it.
        # One scan of the listeners per publish when nobody is behind.
        floor = self._floor()
        if self.log.head - floor > self.max_lag:
            for listener in [x for x in self._listeners if x.lag > self.max_lag]:
                self._listeners.discard(listener)
                self._unwait(listener)
                listener._cut_off()
            floor = self._floor()
        self.log.append(chunks, tokens, pending)
        self.log.trim(floor if self._listeners else self.log.head)
        self._wake()

    def _end(self, error: str | None) -> None:
        self.ended = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        self._published.set()
        self._published = asyncio.Event()
        self._waiting.clear()
        self._demand.clear()
