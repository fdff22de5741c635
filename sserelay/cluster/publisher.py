"""The publisher of a topic (`serve SOURCE --topic NAME`): its source read as it comes,
counted and paced, each batch one entry of the topic's stream (see `topic.py`), stored by the
`PUBLISH` script with ids from Redis' clock; a bounded backlog while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from redis.exceptions import NoScriptError

from sserelay.errors import SourceError
from sserelay.sources.pacing import Pacer, paced
from sserelay.sources.text import Source
from sserelay.streaming.hub import Hub, counted
from sserelay.streaming.log import format_stream_id

from .connection import FAILED, Backoff, Connection, check_cancelled, describe
from .entries import Item
from .errors import RedisUnavailable
from .keys import topic_state, topic_stream
from .scripts import PUBLISH
from .topic import TopicFeed

#: What one PUBLISH call carries at most (bytes of chunks), and calls per round trip:
#: a script runs alone in Redis, so a call is kept short.
CALL_BYTES = 1 << 20
CALLS_PER_TRIP = 4
#: Events a publisher holds while Redis is away, at least (or --history, if larger).
BACKLOG_EVENTS = 100_000


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
        self._backlog: deque[Item] = deque()
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
        paces = self._pacer is not None and self._pacer.active
        batches = counted(self.source, self._count, self._pending, each=paces)
        try:
            async for chunks, tokens, pending in paced(batches, self._pacer):
                await self._room.wait()
                self._hold(Item.batch(chunks, tokens, pending))
            end_tokens = self._count_end() if self._count_end is not None else 0
            self._hold(Item.end(None, end_tokens))
        except SourceError as exc:
            self._hold(Item.end(str(exc) or "the source failed"))
        finally:
            await batches.aclose()

    def _hold(self, item: Item) -> None:
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

    def _calls(self) -> list[list[Item]]:
        """The backlog's first items, in calls of at most CALL_BYTES (one item at least)."""
        calls: list[list[Item]] = []
        call: list[Item] = []
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

    async def _store(self, calls: list[list[Item]]) -> list[list[bytes | int]]:
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

    def _args(self, call: Sequence[Item], number: int) -> list[str | int | bytes]:
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

    def _stored(self, call: list[Item], reply: list[bytes | int]) -> bool:
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
