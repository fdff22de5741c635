"""A topic: one source's events on a Redis stream, served by every instance that follows it.

The publisher (`serve SOURCE --topic NAME`) reads its source as it comes (not at the pace
of its own clients: it cannot see the followers'), and publishes each batch of events as
one stream entry with the `PUBLISH` script: ids from Redis' clock, so they rise whoever
publishes, batches pipelined (one round trip carries many), never one per event. The end
of the source is published too.

Every instance serves its clients from the stream through a `TopicFeed`: one reader per
instance (not per client) that loads what the stream keeps, then follows it with `XREAD
BLOCK` and feeds the local hub, whose StreamLog gives each event its stream id. So a client
can resume with `Last-Event-ID` on any instance: no gap, no duplicate. The publisher's own
hub loads what the stream keeps the same way, then gets each batch once Redis has stored
it, with the ids Redis gave it (the script's reply): the same events and ids as every
follower, without reading its own batches back.

An entry of the stream (all fields bytes):

    k   the number of its first event (events are numbered 1, 2, ... without a gap, so a
        reader that finds a jump knows it missed some: trimmed while it was away)
    c   its events' texts joined by "\n" (none holds one), or, when one does,
    j   its events' texts as a JSON list
    t   each event's tokens: little-endian unsigned 32-bit numbers
    p   what the token count holds back after its last event (a BPE count's open tail)

and the end of a stream, `k` (the number the next event would have), `e` (its error, ''
if none) and `x` (the tokens counted at the end).

Redis lost mid-run: the publisher keeps what its source gives in a bounded backlog (the
source is paused when it is full) and retries; a call whose reply was lost is not stored
twice. Followers keep their clients (heartbeats go on) and read on from their last id when
Redis is back; if entries were trimmed meanwhile, their clients are told `: history
truncated`. One warning line when Redis is lost, one when it is back (connection.Health).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from redis.exceptions import NoScriptError

from sserelay.errors import SourceError
from sserelay.sources.pacing import Pacer, paced
from sserelay.sources.text import Source
from sserelay.streaming.hub import Hub, counted
from sserelay.streaming.log import Batch, StreamId, StreamLog, format_stream_id

from .connection import FAILED, Backoff, Connection, check_cancelled, describe
from .errors import RedisUnavailable
from .keys import topic_state, topic_stream
from .scripts import PUBLISH

#: Entries per read, and how long a read waits for one (ms; under the socket timeout).
READ_COUNT = 1000
BLOCK_MS = 1000
#: What one PUBLISH call carries at most (bytes of chunks), and calls per round trip:
#: a script runs alone in Redis, so a call is kept short.
CALL_BYTES = 1 << 20
CALLS_PER_TRIP = 4
#: Events a publisher holds while Redis is away, at least (or --history, if larger).
BACKLOG_EVENTS = 100_000

#: Stream entries as redis-py gives them (bytes in, bytes out).
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def encode_chunks(chunks: Sequence[str]) -> tuple[str, str]:
    """The field and value an entry keeps `chunks` in: `c`, joined by line ends, unless a
    chunk holds one; then `j`, a JSON list (slower: a line per event is the common case)."""
    joined = "\n".join(chunks)
    if joined.count("\n") == len(chunks) - 1:
        return "c", joined
    return "j", json.dumps(list(chunks), ensure_ascii=False)


def decode_chunks(fields: dict[bytes, bytes]) -> list[str]:
    if b"c" in fields:
        return fields[b"c"].decode().split("\n")
    chunks = json.loads(fields[b"j"])
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise ValueError("j is not a list of texts")
    return chunks


def encode_tokens(tokens: Sequence[int]) -> bytes:
    numbers = array.array("I", tokens)  # 'I' is 32 bits wherever Python runs
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tobytes()


def decode_tokens(data: bytes) -> list[int]:
    numbers = array.array("I")
    numbers.frombytes(data)
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tolist()


def _predecessor(stream_id: StreamId) -> StreamId:
    ms, seq = stream_id
    return (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)


class TopicFeed:
    """The reader of one instance: the topic's stream into the hub (see the module).

    `load(hub)` reads what the stream keeps before the instance listens (RedisUnavailable
    if it cannot); the hub then runs `run(hub)`, which follows the stream until cancelled
    (without `follow`, it does not: a publisher feeds its own hub with `stored`).
    `invalid_utf8` reports the publisher's source's replaced bytes (none for a follower)."""

    on_demand = False

    def __init__(
        self,
        connection: Connection,
        topic: str,
        *,
        warn: Callable[[str], None],
        invalid_utf8: Callable[[], int] = lambda: 0,
        follow: bool = True,
    ) -> None:
        self._connection = connection
        self._follow = follow
        self._key = topic_stream(topic)
        self._topic = topic
        self._warn = warn
        self._invalid_utf8 = invalid_utf8
        self._last = "0-0"  # the id of the last entry read
        self._next_k: int | None = None  # the number the next event should have
        self._skipped = False
        if follow:
            connection.health.consequences.append(
                "clients stay connected and get what they missed when it is back"
            )

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._invalid_utf8()

    async def load(self, hub: Hub) -> None:
        """Everything the stream keeps, into the hub (whose history keeps the newest)."""
        client = self._connection.client
        start = "-"
        try:
            while True:
                entries = cast(
                    Entries, await client.xrange(self._key, start, "+", count=READ_COUNT)
                )
                for entry_id, fields in entries:
                    self._apply(hub, entry_id, fields)
                if len(entries) < READ_COUNT:
                    break
                start = "(" + self._last
        except FAILED as exc:
            raise RedisUnavailable(
                f"cannot read topic {self._topic!r} from redis {self._connection.display}: "
                f"{describe(exc)}"
            ) from None

    async def run(self, hub: Hub) -> None:
        if not self._follow:
            return  # a publisher's own hub: fed by the publisher (`stored`)
        client = self._connection.client
        health = self._connection.health
        backoff = Backoff()
        while True:
            if hub.listeners:  # the pace of the fastest local client, as a source's
                await hub.demanded()
            try:
                reply = cast(
                    list[tuple[bytes, Entries]],
                    await client.xread({self._key: self._last}, count=READ_COUNT, block=BLOCK_MS),
                )
            except FAILED as exc:
                check_cancelled()
                health.lost(exc)
                await backoff.wait()
                continue
            check_cancelled()
            health.ok()
            backoff.reset()
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._apply(hub, entry_id, fields)

    def _apply(self, hub: Hub, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """One entry into the hub: a batch of events, or the end of the stream."""
        self._last = entry_id.decode()
        log = hub.log
        assert isinstance(log, StreamLog)
        try:
            ms, seq = (int(part) for part in self._last.split("-"))
            k = int(fields[b"k"])
            if b"e" in fields:
                error = fields[b"e"].decode() or None
                self._check_number(hub, log, k, (ms, seq))
                hub.end(error, int(fields.get(b"x", b"0")))
                return
            chunks = decode_chunks(fields)
            tokens = decode_tokens(fields[b"t"])
            if len(tokens) != len(chunks):
                raise ValueError("a token count per chunk")
            batch = log.entry((ms, seq), chunks, tokens, int(fields.get(b"p", b"0")))
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            if not self._skipped:  # someone else's entry: say so once, go on
                self._skipped = True
                self._warn(f"topic {self._topic!r}: skipped entry {self._last}: {exc}")
            return
        self._add(hub, batch, k)

    def _add(self, hub: Hub, batch: Batch, k: int) -> None:
        assert batch.stream_id is not None and isinstance(hub.log, StreamLog)
        self._check_number(hub, hub.log, k, batch.stream_id)
        if hub.ended:
            hub.reopen()  # a publisher started again after the end
        hub.publish_batch(batch)
        self._next_k = k + batch.events

    def stored(self, hub: Hub, item: _Item, entry_id: StreamId, k: int) -> None:
        """What this instance's publisher just stored, into its own hub: `item` is the
        entry `entry_id`, its first event numbered `k`."""
        self._last = format_stream_id(entry_id)
        log = hub.log
        assert isinstance(log, StreamLog)
        if item.events == 0:
            self._check_number(hub, log, k, entry_id)
            hub.end(item.text or None, item.end_tokens)
            return
        self._add(hub, log.entry(entry_id, item.chunks, item.tokens, item.pending), k)

    async def catch_up(self, hub: Hub) -> None:
        """Read what the stream has after the last entry this hub got (a publisher whose
        reply was lost: the batches are stored, but it never learnt their ids)."""
        client = self._connection.client
        while True:
            entries = cast(
                Entries,
                await client.xrange(self._key, "(" + self._last, "+", count=READ_COUNT),
            )
            for entry_id, fields in entries:
                self._apply(hub, entry_id, fields)
            if len(entries) < READ_COUNT:
                return

    def _check_number(self, hub: Hub, log: StreamLog, k: int, first_id: StreamId) -> None:
        """Events are numbered from 1 without a gap: an entry whose number is not the one
        expected follows events this instance never got (trimmed while it was away)."""
        expected = self._next_k
        if expected is None:  # the first entry read
            if k > 1 and log.last_id is None:
                log.lost_before = _predecessor(first_id)
        elif k != expected:
            log.lost_before = _predecessor(first_id)
            hub.mark_truncated()
        self._next_k = k


@dataclass(slots=True)
class _Item:
    """A batch of events (or, `events` 0, the end) ready to publish: as the publisher's hub
    takes it, and as the script does (`field` and `text`: the chunks encoded; `counts`: the
    tokens encoded; for the end, `text` is its error, '' if none)."""

    events: int
    chunks: Sequence[str]
    tokens: Sequence[int]
    pending: int
    field: str
    text: str
    counts: bytes
    end_tokens: int = 0

    @classmethod
    def batch(cls, chunks: Sequence[str], tokens: Sequence[int], pending: int) -> _Item:
        field, text = encode_chunks(chunks)
        return cls(len(chunks), chunks, tokens, pending, field, text, encode_tokens(tokens))

    @classmethod
    def end(cls, error: str | None, end_tokens: int = 0) -> _Item:
        return cls(0, (), (), 0, "", error or "", str(end_tokens).encode(), end_tokens)


class Publisher:
    """`serve SOURCE --topic NAME`: the source, counted and paced, onto the topic's stream
    (see the module). `open()` checks Redis before the run listens; `run()` returns once the
    end of the source is stored (or raises CancelledError when the run stops first).
    `instance` names the publisher (a retried call is recognised by it); `history` is what
    the stream keeps (events, at least: it is trimmed by whole entries). With `mirror`
    (this instance's feed and hub), each batch goes to the hub once stored, with its ids."""

    def __init__(
        self,
        connection: Connection,
        topic: str,
        source: Source,
        *,
        instance: str,
        count: Callable[[str], int],
        count_end: Callable[[], int] | None = None,
        pending: Callable[[], int] | None = None,
        pacer: Pacer | None = None,
        history: int,
        mirror: tuple[TopicFeed, Hub] | None = None,
    ) -> None:
        self._connection = connection
        self._mirror = mirror
        self._keys = [topic_stream(topic), topic_state(topic)]
        self.topic = topic
        self.source = source
        self._instance = instance
        self._count = count
        self._count_end = count_end
        self._pending = pending
        self._pacer = pacer
        self._history = history
        self._limit = max(BACKLOG_EVENTS, history)
        self._backlog: deque[_Item] = deque()
        #: events read from the source and not stored yet
        self.held = 0
        self._ready = asyncio.Event()  # the backlog has something
        self._room = asyncio.Event()  # the backlog has room
        self._room.set()
        self._sha = ""
        self._number = 1  # the number of the next batch to store
        self._floor: tuple[int, int, int] = (0, 0, 1)  # the last (ms, seq) stored, next k
        self._kept: deque[tuple[str, int]] = deque()  # (entry id, events) within the history
        self._kept_events = 0
        self._trimmed = False  # the stream holds more than the history: trim it
        self._trim_due = False  # ... and no call has trimmed it since
        self.published = 0
        connection.health.consequences.append(
            f"the publisher keeps up to {self._limit} events of its source and retries"
        )

    async def open(self) -> None:
        """Load the script and read where the topic is (RedisUnavailable if Redis fails)."""
        client = self._connection.client
        try:
            self._sha = await client.script_load(PUBLISH)
            state = cast(list[bytes | None], await client.hmget(self._keys[1], ["ms", "seq", "k"]))
        except FAILED as exc:
            raise RedisUnavailable(
                f"cannot publish to topic {self.topic!r} on redis {self._connection.display}: "
                f"{describe(exc)}"
            ) from None
        ms, seq, k = state
        if ms is not None and seq is not None and k is not None:
            self._floor = (int(ms), int(seq), int(k))

    async def run(self) -> None:
        reading = asyncio.create_task(self._read())
        sending = asyncio.create_task(self._send())
        waiting = {reading, sending}
        try:
            while sending in waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if reading in done:
                    reading.result()  # a bug reading the source is not to be waited out
            sending.result()
        finally:
            for task in (reading, sending):
                task.cancel()
            await asyncio.gather(reading, sending, return_exceptions=True)

    # ------------------------------------------------------------------ the source side

    async def _read(self) -> None:
        batches = counted(self.source, self._count, self._pending)
        try:
            async for chunks, tokens, pending in paced(batches, self._pacer):
                await self._room.wait()
                self._hold(_Item.batch(chunks, tokens, pending))
            end_tokens = self._count_end() if self._count_end is not None else 0
            self._hold(_Item.end(None, end_tokens))
        except SourceError as exc:
            self._hold(_Item.end(str(exc) or "the source failed"))
        finally:
            await batches.aclose()

    def _hold(self, item: _Item) -> None:
        self._backlog.append(item)
        self.held += item.events
        self._ready.set()
        if self.held >= self._limit:
            self._room.clear()  # the source waits: a pipe's producer is held back

    # ------------------------------------------------------------------ the Redis side

    async def _send(self) -> None:
        health = self._connection.health
        backoff = Backoff()
        while True:
            await self._ready.wait()
            calls = self._calls()
            try:
                replies = await self._store(calls)
            except FAILED as exc:
                check_cancelled()
                health.lost(exc)
                await backoff.wait()
                continue
            check_cancelled()
            health.ok()
            backoff.reset()
            ended = lost = False
            for call, reply in zip(calls, replies, strict=True):
                ended = self._stored(call, reply) or ended
                lost = lost or int(reply[0]) == 0
            if lost and self._mirror is not None:
                with contextlib.suppress(*FAILED):  # what is left comes with the next call
                    await self._mirror[0].catch_up(self._mirror[1])
                check_cancelled()
            if not self._backlog:
                self._ready.clear()
                await self._trim()
            if ended:
                return

    async def _trim(self) -> None:
        """Trim now what the calls sent so far have pushed out of the history (each call
        trims what was out before it; the last one's leave nothing to a next)."""
        if not self._trim_due:
            return
        self._trim_due = False
        with contextlib.suppress(*FAILED):  # the next call trims it, if any
            await self._connection.client.xtrim(
                self._keys[0], minid=self._minid(), approximate=True
            )

    def _calls(self) -> list[list[_Item]]:
        """The backlog's first items, in calls of at most CALL_BYTES (one item at least)."""
        calls: list[list[_Item]] = []
        call: list[_Item] = []
        size = 0
        for item in self._backlog:
            if call and size + len(item.text) > CALL_BYTES:
                calls.append(call)
                if len(calls) == CALLS_PER_TRIP:
                    return calls
                call, size = [], 0
            call.append(item)
            size += len(item.text)
            if item.events == 0:
                break  # nothing comes after the end
        if call:
            calls.append(call)
        return calls

    async def _store(self, calls: list[list[_Item]]) -> list[list[bytes | int]]:
        client = self._connection.client
        number = self._number
        try:
            async with client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(self._sha, 2, *self._keys, *self._args(call, number))
                    number += len(call)
                replies: list[list[bytes | int]] = await pipe.execute()
        except NoScriptError:  # Redis restarted and forgot the script: load it, send again
            self._sha = await client.script_load(PUBLISH)
            return await self._store(calls)
        return replies

    def _args(self, call: Sequence[_Item], number: int) -> list[str | int | bytes]:
        ms, seq, k = self._floor
        self._trim_due = False
        args: list[str | int | bytes] = [self._instance, number, ms, seq, k, self._minid()]
        for item in call:
            args += [item.events, item.field, item.text, item.counts, item.pending]
        return args

    def _minid(self) -> str:
        """The id to trim the stream to: the oldest entry that holds the last `history`
        events ('' while nothing need go)."""
        if not self._trimmed:
            return ""
        if self._kept:
            return self._kept[0][0]
        ms, seq, _ = self._floor
        return f"{ms}-{seq + 1}"  # no history at all: everything stored so far

    def _stored(self, call: list[_Item], reply: list[bytes | int]) -> bool:
        """Take a call off the backlog once Redis has it; True if it held the end."""
        applied, ms, k, first = (int(value) for value in reply[:4])
        seqs = [int(seq) for seq in reply[4:]]
        self._number += len(call)
        self._floor = (ms, seqs[-1], k)
        for index, item in enumerate(call):
            self._backlog.popleft()
            self.held -= item.events
            if not applied:
                continue  # stored before: its ids come back with catch_up()
            if self._mirror is not None:
                self._mirror[0].stored(self._mirror[1], item, (ms, seqs[index]), first)
            first += item.events
            if item.events:
                self.published += item.events
                self._keep(format_stream_id((ms, seqs[index])), item.events)
        if self.held < self._limit:
            self._room.set()
        return call[-1].events == 0

    def _keep(self, entry_id: str, events: int) -> None:
        self._kept.append((entry_id, events))
        self._kept_events += events
        while self._kept and self._kept_events - self._kept[0][1] >= self._history:
            self._kept_events -= self._kept.popleft()[1]
            self._trimmed = self._trim_due = True
