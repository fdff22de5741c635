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

The entries' fields are in `entries.py`, the publisher in `publisher.py`.

Redis lost mid-run: the publisher keeps what its source gives in a bounded backlog (the
source is paused when it is full) and retries; a call whose reply was lost is not stored
twice. Followers keep their clients (heartbeats go on) and read on from their last id when
Redis is back; if entries were trimmed meanwhile, their clients are told `: history
truncated`. One warning line when Redis is lost, one when it is back (connection.Health).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from sserelay.streaming.hub import Hub
from sserelay.streaming.log import Batch, StreamId, StreamLog, format_stream_id

from .connection import FAILED, Backoff, Connection, check_cancelled, describe
from .entries import Entries, Item, decode_chunks, decode_tokens
from .errors import RedisUnavailable
from .keys import topic_stream

#: Entries per read, and how long a read waits for one (ms; under the socket timeout).
READ_COUNT = 1000
BLOCK_MS = 1000


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

    def stored(self, hub: Hub, item: Item, entry_id: StreamId, k: int) -> None:
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
