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

What fills the log is the hub's `Feed`, its bus. The memory bus is today's single instance:
a `SourceFeed` reads the source (only while a listener waits) into an `EventLog` whose ids
are the events' numbers. Several instances share a Redis stream instead
(sserelay.cluster): there one reader per instance reads the topic into a `StreamLog`, whose
events carry the stream's ids (`1700000000000-5`), so a client can resume on any instance.
Listeners, cursors, the cut-off and the per-event path are the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from sserelay.errors import SourceError
from sserelay.sources.pacing import Counted, Pacer, paced
from sserelay.sources.text import Source, TimedBatch
from sserelay.streaming.log import (
    DEFAULT_HISTORY,
    Batch,
    BatchFrames,
    EventLog,
    StreamId,
    StreamLog,
)
from sserelay.wire.frames import Frames

#: Sent to a client whose starting point has already been dropped from the history.
HISTORY_TRUNCATED = b": history truncated\n\n"

DEFAULT_MAX_LAG = 10_000
#: How long `serve` waits for a client that left before the end to come back (resume with
#: Last-Event-ID): an EventSource reconnects within a second after a network blip (the
#: stream sends `retry: 1000`), so two seconds cover it, while a pipeline whose only client
#: hangs up still ends promptly.
DEFAULT_LINGER = 2.0


class Listener:
    """One client's place in the hub: an async iterator of the Frames to send it.

    It ends when the stream has ended and everything was taken, raises
    SourceError when the source failed, and ends at once when the hub cut it
    off (`cut` is then true). `aclose()` leaves the hub."""

    def __init__(
        self,
        hub: Hub,
        cursor: int,
        truncated: bool,
        on_cut: Callable[[], None],
        greeting: bytes = b"",
    ) -> None:
        self._hub = hub
        self.cursor = cursor
        #: `: history truncated`, said before the first event (or at once if there is none)
        self.notice = HISTORY_TRUNCATED if truncated else b""
        #: fields that go in the first event's block (`retry:`): never a block of their own,
        #: which some clients (httpx-sse) would take for an empty event
        self.greeting = greeting
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
                if self.notice or self.greeting:
                    notice, self.notice = self.notice, b""
                    if frames.events and self.greeting:
                        notice, self.greeting = notice + self.greeting, b""
                    if isinstance(frames, BatchFrames):
                        return frames.led_by(notice)
                    return Frames(
                        notice + frames.payload, frames.events, frames.tokens, frames.pending
                    )
                return frames
            if self.notice:  # say so now, not with the next event
                notice, self.notice = self.notice, b""
                return Frames(notice, 0, 0)
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


class Feed(Protocol):
    """What fills a hub's log: its bus. `run(hub)` publishes into the hub (`publish`,
    `publish_batch`, `end`) until the stream ends or the task is cancelled (the hub
    closing). With `on_demand` it runs only once a listener waits for more, and should read
    only while one does (`await hub.demanded()`); else the hub starts it at once, and
    `demanded()` also returns once nobody listens (a topic's reader then keeps the history
    fresh; while listeners are connected, it goes at the pace of the fastest, as a source)."""

    on_demand: bool

    @property
    def invalid_utf8_bytes(self) -> int: ...

    async def run(self, hub: Hub) -> None: ...


async def counted(
    source: Source,
    count: Callable[[str], int],
    pending: Callable[[], int] | None = None,
    ready: Callable[[], Awaitable[object]] | None = None,
    *,
    each: bool = True,
) -> AsyncGenerator[Counted, None]:
    """The source's batches with each chunk's tokens (and, with `pending`, what the count
    holds back after each chunk; with `each` False, after the batch's last chunk only: all
    that an unpaced batch needs, since a client is given whole batches or their tails), read
    only once `ready` (if given) returns each time."""
    batches = aiter(source.batches())
    try:
        while True:
            if ready is not None:
                await ready()
            try:
                batch = await anext(batches)
            except StopAsyncIteration:
                return
            at = None
            if isinstance(batch, TimedBatch):
                at, batch = batch.at, batch.chunks
            if not batch:
                continue
            if pending is None:
                yield batch, [count(chunk) for chunk in batch], at, ()
            elif not each:
                # A BPE count's open tail, counted once per batch rather than per chunk: one
                # BPE call less per event (serve o200k_base on unique lines: 2.5 -> 1.7 us).
                yield batch, [count(chunk) for chunk in batch], at, (pending(),)
            else:  # a BPE count: what it holds back after each chunk, too
                tokens, pendings = [], []
                for chunk in batch:
                    tokens.append(count(chunk))
                    pendings.append(pending())
                yield batch, tokens, at, pendings
    finally:
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()


class SourceFeed:
    """The memory bus: a source read into the hub's EventLog, only while a listener waits.

    `count` gives each chunk's tokens, in order (a TokenCounter's `feed` counts over the
    joined text), and `pending`, if given, what it then holds back (a BPE count's open
    tail, billed to a client that leaves there). `count_end`, called once when the source
    ends, gives the tokens `count` could not know until then (a last NDJSON line with no
    line end, a BPE count's tail). `pacer` spaces events out (`--rate`, `--delay`,
    `--realtime`). `clock` and `sleep` are injected for tests."""

    on_demand = True

    def __init__(
        self,
        source: Source,
        *,
        count: Callable[[str], int],
        count_end: Callable[[], int] | None = None,
        pending: Callable[[], int] | None = None,
        pacer: Pacer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.source = source
        self._count = count
        self._count_end = count_end
        self._pending = pending
        self._pacer = pacer if pacer is not None and pacer.active else None
        self._clock = clock
        self._sleep = sleep

    @property
    def invalid_utf8_bytes(self) -> int:
        return self.source.invalid_utf8_bytes

    async def run(self, hub: Hub) -> None:
        batches = counted(
            self.source, self._count, self._pending, hub.demanded, each=self._pacer is not None
        )
        try:
            async for chunks, tokens, pending in paced(
                batches, self._pacer, ready=hub.demanded, clock=self._clock, sleep=self._sleep
            ):
                hub.publish(chunks, tokens, pending)
            hub.end(None, self._count_end() if self._count_end is not None else 0)
        except SourceError as exc:
            hub.end(str(exc))
        finally:
            await batches.aclose()


class Hub:
    """One stream, many listeners. `join()` a listener per client; `aclose()` stops the
    reader (and closes the source).

    `Hub(source, count=...)` reads `source` through a SourceFeed (see it for `count`,
    `count_end`, `pending`, `pacer`, `clock` and `sleep`) into an EventLog of `history`
    events; `Hub.over(feed, log)` reads any other feed (a Redis topic) into `log`.
    The tokens counted at the end are `end_tokens`, billed with no bytes to every
    listener that took the last event."""

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
        feed = SourceFeed(
            source,
            count=count,
            count_end=count_end,
            pending=pending,
            pacer=pacer,
            clock=clock,
            sleep=sleep,
        )
        self._setup(feed, EventLog(history, ids=ids), max_lag)

    @classmethod
    def over(cls, feed: Feed, log: EventLog, *, max_lag: int = DEFAULT_MAX_LAG) -> Hub:
        """A hub whose events come from `feed` into `log` (a Redis topic into a StreamLog)."""
        hub = cls.__new__(cls)
        hub._setup(feed, log, max_lag)
        return hub

    def _setup(self, feed: Feed, log: EventLog, max_lag: int) -> None:
        if max_lag < 1:
            raise ValueError("max_lag must be at least 1")
        self.feed = feed
        self.log = log
        self.max_lag = max_lag
        self.ended = False
        self.error: str | None = None
        self.end_tokens = 0
        self._listeners: set[Listener] = set()
        self._waiting: set[Listener] = set()
        #: listeners that resumed from an id this hub has not read yet: what they already
        #: have is skipped as it arrives
        self._ahead: dict[Listener, StreamId] = {}
        self._demand = asyncio.Event()  # some listener has taken everything and waits
        self._published = asyncio.Event()  # replaced at each publish
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        #: called when the stream ends (after the listeners are woken)
        self.on_end: Callable[[], None] | None = None

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    @property
    def invalid_utf8_bytes(self) -> int:
        """Invalid UTF-8 bytes the source had (replaced with U+FFFD)."""
        return self.feed.invalid_utf8_bytes

    def start(self) -> None:
        """Start the reader now (a feed that is not read on demand)."""
        if self._reader is None and not self._closed:
            self._reader = asyncio.create_task(self._read())

    def join(
        self,
        last_event_id: str | None = None,
        on_cut: Callable[[], None] = lambda: None,
        greeting: bytes = b"",
    ) -> Listener:
        """A listener that starts right after `last_event_id` (a `Last-Event-ID`
        value), or at the first event kept when there is none. `on_cut` is
        called if it falls more than `max_lag` events behind; `greeting` goes
        before its first event (a `retry:` field)."""
        self.log.trim(self._floor())  # what others took since the last publish may go now
        cursor, truncated = self.log.resume(last_event_id)
        listener = Listener(self, cursor, truncated, on_cut, greeting)
        self._listeners.add(listener)
        ahead = self.log.ahead_of(last_event_id)
        if ahead is not None:
            self._ahead[listener] = ahead
        return listener

    def has_everything(self, last_event_id: str | None) -> bool:
        """Whether the stream has ended and a client that saw `last_event_id`
        already has all of it (it can be told so instead of being served)."""
        return self.ended and self.error is None and self.log.is_last(last_event_id)

    def leave(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        self._ahead.pop(listener, None)
        self._unwait(listener)
        self.log.trim(self._floor())
        if not self._listeners and not self.feed.on_demand:
            self._demand.set()  # a topic's reader keeps the history fresh while nobody listens

    async def demanded(self) -> None:
        """Return once some listener has taken everything and waits for more."""
        await self._demand.wait()

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
        await self.feed.run(self)

    # ------------------------------------------------------------------ what a feed calls

    def publish(self, chunks: Sequence[str], tokens: Sequence[int], pending: int = 0) -> None:
        """Publish `chunks` (with their tokens, and what the count holds back after the
        last of them) as the next events, numbered by the log."""
        floor = self._make_room()
        self.log.append(chunks, tokens, pending)
        self.log.trim(floor if self._listeners else self.log.head)
        self._wake()

    def publish_batch(self, batch: Batch) -> None:
        """Publish a batch the feed made with the log (a topic's entry, with its ids)."""
        floor = self._make_room()
        self.log.add(batch)
        if self._ahead:
            self._skip_ahead(batch)
            floor = self._floor()
        self.log.trim(floor if self._listeners else self.log.head)
        self._wake()

    def end(self, error: str | None, end_tokens: int = 0) -> None:
        """The stream has ended (`error`: how it failed), with `end_tokens` counted at the end."""
        self.ended = True
        self.error = error
        self.end_tokens = end_tokens if error is None else 0
        self._wake()
        if self.on_end is not None:
            self.on_end()

    def reopen(self) -> None:
        """More comes after an end (a topic's publisher started again)."""
        self.ended = False
        self.error = None
        self.end_tokens = 0

    def mark_truncated(self) -> None:
        """Events were lost before what comes next (a topic trimmed while its reader was
        away): every listener says so at its next read."""
        for listener in self._listeners:
            listener.notice = HISTORY_TRUNCATED

    def _make_room(self) -> int:
        # Lag is counted before this batch: one big read never cuts a client
        # that had taken everything before it.
        # One scan of the listeners per publish when nobody is behind.
        floor = self._floor()
        if self.log.head - floor > self.max_lag:
            for listener in [x for x in self._listeners if x.lag > self.max_lag]:
                self._listeners.discard(listener)
                self._ahead.pop(listener, None)
                self._unwait(listener)
                listener._cut_off()
            floor = self._floor()
        return floor

    def _skip_ahead(self, batch: Batch) -> None:
        """Listeners that resumed from an id not read yet skip what they already have."""
        log = self.log
        assert isinstance(log, StreamLog)
        for listener, after in list(self._ahead.items()):
            if listener.cursor != batch.first:
                continue
            skip = log.count_through(batch, after)
            listener.cursor = batch.first + skip
            if skip < batch.events or log.id_of(batch, batch.events - 1) == after:
                del self._ahead[listener]  # past it now

    def _wake(self) -> None:
        self._published.set()
        self._published = asyncio.Event()
        self._waiting.clear()
        self._demand.clear()
