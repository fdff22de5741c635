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
import bisect
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

from sserelay.errors import SourceError
from sserelay.sources.pacing import Counted, Pacer, paced
from sserelay.sources.text import Source, TimedBatch
from sserelay.wire.frames import Frames
from sserelay.wire.sse import encode_batch

#: Sent to a client whose starting point has already been dropped from the history.
HISTORY_TRUNCATED = b": history truncated\n\n"

DEFAULT_HISTORY = 10_000
DEFAULT_MAX_LAG = 10_000
#: How long `serve` waits for a client that left before the end to come back (resume with
#: Last-Event-ID): an EventSource reconnects within a second after a network blip (the
#: stream sends `retry: 1000`), so two seconds cover it, while a pipeline whose only client
#: hangs up still ends promptly.
DEFAULT_LINGER = 2.0


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
    #: the Redis stream id (ms, seq) of its first event, the others following in seq (a
    #: StreamLog's); None where ids are the events' numbers
    stream_id: tuple[int, int] | None = None
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


#: A Redis stream id, `ms-seq`, as a pair of numbers: ordered as Redis orders them.
StreamId = tuple[int, int]
#: A resume from an id this far (ms) past the wall clock is from no stream of ours.
_FUTURE_MS = 60_000
_MAX_SEQ = 2**64 - 1  # Redis: a stream id's parts are unsigned 64-bit numbers


def parse_stream_id(value: str | None) -> StreamId | None:
    """A `Last-Event-ID` as a Redis stream id `ms-seq` (both ASCII digits); None otherwise."""
    if value is None:
        return None
    ms, dash, seq = value.strip().partition("-")
    if not dash or not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    parsed = int(ms), int(seq)
    return parsed if max(parsed) <= _MAX_SEQ else None


def format_stream_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


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

    def add(self, batch: Batch) -> None:
        """Publish a batch made for this log (its first event is `head`)."""
        if batch.first != self.head:
            raise ValueError(f"batch starts at {batch.first}, not at the head {self.head}")
        self._batches.append(batch)
        self.head = batch.next

    def resume(self, last_event_id: str | None) -> tuple[int, bool]:
        """`start()` for a `Last-Event-ID` value as a client sends it."""
        return self.start(parse_event_id(last_event_id))

    def is_last(self, last_event_id: str | None) -> bool:
        """Whether `last_event_id` is the id of the newest event."""
        seen = parse_event_id(last_event_id)
        return seen is not None and seen + 1 == self.head

    def ahead_of(self, last_event_id: str | None) -> StreamId | None:
        """An id later than every event here that may yet come (another instance has it):
        never, with numbered events."""
        return None

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


class StreamLog(EventLog):
    """The events of a Redis stream as one instance has read them: an EventLog whose
    events carry the stream's ids instead of their numbers (the cursors stay numbers).

    A stream entry holds a batch of events whose ids follow one another in the same
    millisecond (`ms-5`, `ms-6`, ...), and the entry's own id is its last event's, so
    `XRANGE stream (ID +` returns exactly the entries with events after ID. `entry()` makes
    the batch of one entry; `resume()` finds where a client that has seen an id starts,
    on this instance or, as an id from another instance not read here yet, `ahead_of()`.
    `lost_before` is the id of the newest event known to be gone (trimmed here, or before
    what this instance first read); `clock` (epoch seconds) tells an id from the future."""

    def __init__(self, history: int = DEFAULT_HISTORY, *, clock: Callable[[], float] = time.time):
        super().__init__(history, ids=True)
        self.lost_before: StreamId | None = None
        self._clock = clock

    def entry(
        self, last_id: StreamId, chunks: Sequence[str], tokens: Sequence[int], pending: int = 0
    ) -> Batch:
        """The batch of a stream entry whose id is `last_id` (its last event's), next in
        this log. Its events' ids are the ones before it in the same millisecond."""
        ms, last_seq = last_id
        first_seq = last_seq - len(chunks) + 1
        if not chunks or first_seq < 0:
            raise ValueError(f"entry {format_stream_id(last_id)} cannot hold {len(chunks)} events")
        newest = self.last_id
        if newest is not None and (ms, first_seq) <= newest:
            raise ValueError(f"entry {format_stream_id(last_id)} is not after the newest event")
        payload, ends = encode_batch(chunks, first_seq, f"{ms}-")
        return Batch(self.head, payload, ends, tuple(accumulate(tokens)), pending, (ms, first_seq))

    @staticmethod
    def id_of(batch: Batch, index: int) -> StreamId:
        """The id of the `index`th event of `batch` (0 is its first)."""
        assert batch.stream_id is not None
        return batch.stream_id[0], batch.stream_id[1] + index

    @staticmethod
    def count_through(batch: Batch, seen: StreamId) -> int:
        """How many of `batch`'s events have ids up to `seen`."""
        assert batch.stream_id is not None
        ms, first = batch.stream_id
        if seen[0] != ms:
            return 0 if seen[0] < ms else batch.events
        return min(max(seen[1] - first + 1, 0), batch.events)

    @property
    def last_id(self) -> StreamId | None:
        """The id of the newest event, if one is kept."""
        if not self._batches:
            return None
        newest = self._batches[-1]
        return self.id_of(newest, newest.events - 1)

    @property
    def oldest_id(self) -> StreamId | None:
        return self._batches[0].stream_id if self._batches else None

    def resume(self, last_event_id: str | None) -> tuple[int, bool]:
        seen = parse_stream_id(last_event_id)
        newest, oldest = self.last_id, self.oldest_id
        if seen is not None and self.ahead_of(last_event_id) is not None:
            return self.head, False  # what it has is skipped as it arrives (Hub._skip_ahead)
        if seen is None or newest is None or oldest is None or seen > newest:
            # nothing seen (or an id this stream never had): from the oldest kept
            return self.oldest, self.lost_before is not None
        if seen < oldest:
            return self.oldest, self.lost_before is not None and seen < self.lost_before
        keys = [self.id_of(b, b.events - 1) for b in self._batches]
        index = bisect.bisect_right(keys, seen)  # the first batch with an event after `seen`
        if index == len(self._batches):
            return self.head, False
        batch = self._batches[index]
        return batch.first + self.count_through(batch, seen), False

    def is_last(self, last_event_id: str | None) -> bool:
        seen = parse_stream_id(last_event_id)
        return seen is not None and seen == self.last_id

    def ahead_of(self, last_event_id: str | None) -> StreamId | None:
        seen = parse_stream_id(last_event_id)
        if seen is None or seen[0] > self._clock() * 1000 + _FUTURE_MS:
            return None
        newest = self.last_id
        if newest is None:
            # Nothing read yet: an id past what is known to be gone may still come.
            lost = self.lost_before
            return seen if lost is not None and seen > lost else None
        return seen if seen > newest else None

    def trim(self, floor: int) -> None:
        keep_from = min(floor, self.head - self.history)
        while self._batches and self._batches[0].next <= keep_from:
            gone = self._batches.popleft()
            self.lost_before = self.id_of(gone, gone.events - 1)


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
) -> AsyncGenerator[Counted, None]:
    """The source's batches with each chunk's tokens (and, with `pending`, what the count
    holds back after each), read only once `ready` (if given) returns each time."""
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
        batches = counted(self.source, self._count, self._pending, hub.demanded)
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
