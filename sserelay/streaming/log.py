"""The hub's log: batches of encoded events with their ids, kept for resume (pure).

`EventLog` numbers events from 1 (a single instance); `StreamLog` holds a Redis stream's
events with the stream's ids (`1700000000000-5`), so a client resumes on any instance. A
listener reads the log at its own cursor; `trim` keeps the last `history` events and what a
connected listener has yet to take.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from sserelay.wire.frames import Frames
from sserelay.wire.sse import encode_batch

#: Events a log keeps for resume (`--history`) beyond what connected listeners still need.
DEFAULT_HISTORY = 10_000


@dataclass(frozen=True, slots=True, eq=False)
class BatchFrames(Frames):
    """Events `skip`... of one batch, whose event ends and running token totals it keeps,
    so that its first events can be cut off (`head`): a stream whose key's budget cannot
    take them all is given the events that fit, not cut a whole batch short."""

    ends: tuple[int, ...] = ()
    totals: tuple[int, ...] = ()
    skip: int = 0
    #: bytes before the first event (a notice, or fields of the first event's block)
    lead: int = 0

    def led_by(self, lead: bytes) -> BatchFrames:
        """The same events with `lead` written before them."""
        return BatchFrames(
            lead + self.payload,
            self.events,
            self.tokens,
            self.pending,
            self.ends,
            self.totals,
            self.skip,
            self.lead + len(lead),
        )

    def head(self, count: int) -> Frames:
        """The first `count` events of these (1 <= count <= events), as a Frames; what the
        count holds back after them is not kept (only after the batch), so this is for a
        count that holds nothing back (`pending` 0)."""
        skip, ends, totals = self.skip, self.ends, self.totals
        base_bytes = ends[skip - 1] if skip else 0
        base_tokens = totals[skip - 1] if skip else 0
        last = skip + count - 1
        size = self.lead + ends[last] - base_bytes
        return Frames(self.payload[:size], count, totals[last] - base_tokens)


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
        whole = BatchFrames(
            self.payload, self.events, self.tokens, self.pending, self.ends, self.token_totals
        )
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
        return BatchFrames(
            self.payload[offset:],
            self.events - skip,
            self.tokens - self.token_totals[skip - 1],
            self.pending,
            self.ends,
            self.token_totals,
            skip,
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
