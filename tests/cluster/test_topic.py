"""A topic on a real Redis, in one process: a publisher, the hubs of several instances over
the same stream, their ids, trimming, restarts, and Redis lost and back mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sserelay import SSEDecoder
from sserelay.cluster.connection import Connection
from sserelay.cluster.errors import RedisUnavailable
from sserelay.cluster.keys import topic_stream
from sserelay.cluster.publisher import Publisher
from sserelay.cluster.topic import TopicFeed
from sserelay.errors import SourceError
from sserelay.metering.tokens import count_tokens
from sserelay.sources.text import Batch
from sserelay.streaming.hub import HISTORY_TRUNCATED, Hub, Listener
from sserelay.streaming.log import StreamLog
from tests.services import RedisServer, free_port

Event = tuple[str | None, str]


class Gate:
    """A source the test feeds batch by batch (None ends it, an exception fails it)."""

    name = "gate"
    timed = False
    invalid_utf8_bytes = 0

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Batch | Exception | None] = asyncio.Queue()

    def feed(self, *items: Batch | Exception | None) -> None:
        for item in items:
            self.queue.put_nowait(item)

    async def batches(self) -> AsyncIterator[Batch]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item


def run(main: Callable[[], Awaitable[None]], timeout: float = 15) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


@asynccontextmanager
async def connected(
    server: RedisServer, warnings: list[str] | None = None
) -> AsyncIterator[Connection]:
    said = warnings if warnings is not None else []
    connection = await Connection.open(server.url, said.append)
    try:
        yield connection
    finally:
        await connection.aclose()


@asynccontextmanager
async def instance(
    connection: Connection, topic: str = "t", history: int = 1000
) -> AsyncIterator[Hub]:
    """One instance's hub over the topic, loaded and following it."""
    feed = TopicFeed(connection, topic, warn=lambda message: None)
    hub = Hub.over(feed, StreamLog(history))
    await feed.load(hub)
    hub.start()
    try:
        yield hub
    finally:
        await hub.aclose()


@asynccontextmanager
async def publishing(
    connection: Connection,
    source: Gate,
    topic: str = "t",
    history: int = 1000,
    name: str = "publisher-1",
) -> AsyncIterator[tuple[Publisher, asyncio.Task[None]]]:
    publisher = Publisher(
        connection, topic, source, instance=name, count=count_tokens, history=history
    )
    await publisher.open()
    task = asyncio.create_task(publisher.run())
    try:
        yield publisher, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def take(listener: Listener, events: int) -> list[Event]:
    decoder = SSEDecoder()
    got: list[Event] = []
    while len(got) < events:
        frames = await anext(listener)
        got += [(e.id, e.data) for e in decoder.decode(frames.payload)]
    return got


async def rest(listener: Listener) -> list[Event]:
    decoder = SSEDecoder()
    return [(e.id, e.data) async for frames in listener for e in decoder.decode(frames.payload)]


def ids_rise(events: list[Event]) -> bool:
    ids = [tuple(int(part) for part in (i or "").split("-")) for i, _ in events]
    return all(a < b for a, b in pairwise(ids))


def test_every_instance_serves_the_same_events_with_the_same_ids(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            async with instance(connection) as one, instance(connection) as two:
                a, b = one.join(), two.join()
                async with publishing(connection, source) as (publisher, task):
                    source.feed(["one two", "three"], ["four"], None)
                    await task  # the end is stored
                got_a, got_b = await rest(a), await rest(b)
                assert [data for _, data in got_a] == ["one two", "three", "four"]
                assert got_a == got_b and ids_rise(got_a)
                assert publisher.published == 3 and publisher.held == 0
                # A resume from any id, on the other instance: the rest, once.
                again = [item async for item in two.join(got_a[0][0])]
                assert sum(f.events for f in again) == 2 and sum(f.tokens for f in again) == 2
                assert one.has_everything(got_a[-1][0]) and two.has_everything(got_a[-1][0])

    run(main)


def test_an_instance_started_later_loads_what_the_stream_keeps(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            async with publishing(connection, source) as (_, task):
                source.feed(["a"], ["b", "c"], None)
                await task
            async with instance(connection) as late:
                got = await rest(late.join())
        assert [data for _, data in got] == ["a", "b", "c"]
        assert late.ended and late.error is None

    run(main)


def test_a_publisher_started_again_continues_the_ids(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with connected(redis_server) as connection:
            first, second = Gate(), Gate()
            async with instance(connection) as hub:
                listener = hub.join()
                async with publishing(connection, first, name="first"):
                    first.feed(["a", "b"])
                    before = await take(listener, 2)
                # It died mid-stream (no end): the listener is still waiting.
                assert not hub.ended
                async with publishing(connection, second, name="second") as (_, task):
                    second.feed(["c"], None)
                    await task
                after = await rest(listener)
        assert [d for _, d in before + after] == ["a", "b", "c"] and ids_rise(before + after)

    run(main)


def test_a_call_sent_again_after_a_lost_reply_is_not_stored_twice(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            publisher = Publisher(
                connection, "t", source, instance="p", count=count_tokens, history=100
            )
            await publisher.open()
            source.feed(["a", "b"], None)
            reading = asyncio.create_task(publisher._read())
            await reading
            calls = publisher._calls()
            await publisher._store(calls)
            replies = await publisher._store(calls)  # the same call, as after a lost reply
            assert replies[0][0] == 0  # stored before: not again
            assert await connection.client.xlen(topic_stream("t")) == 2  # the batch, the end

    run(main)


def test_the_stream_keeps_the_history_and_a_late_resume_is_told_what_it_lost(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            async with publishing(connection, source, history=10) as (_, task):
                for i in range(300):
                    source.feed([f"w{i}"])
                source.feed(None)
                await task
            length = await connection.client.xlen(topic_stream("t"))
            assert 11 <= length < 300  # trimmed by whole nodes (~): at least the history
            async with instance(connection, history=10) as late:
                listener = late.join(f"{1}-0")  # an id long gone
                frames = await anext(listener)
        assert frames.payload.startswith(HISTORY_TRUNCATED)

    run(main)


def test_a_failing_source_is_published_as_its_error(redis_server: RedisServer) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            async with instance(connection) as hub, publishing(connection, source) as (_, task):
                listener = hub.join()
                source.feed(["a"], SourceError("cannot read stdin: Input/output error"))
                await task
                with pytest.raises(SourceError, match="Input/output error"):
                    await rest(listener)

    run(main)


def test_redis_lost_mid_stream_loses_nothing_and_says_so_once_each_way(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        warnings: list[str] = []
        async with connected(redis_server, warnings) as connection:
            async with instance(connection) as hub, publishing(connection, source) as (pub, task):
                listener = hub.join()
                source.feed(["a"])
                got = await take(listener, 1)
                redis_server.stop()  # an empty Redis comes back: nothing was saved
                source.feed(["b"], ["c"])
                await asyncio.sleep(0.3)
                assert pub.held == 2 and len(warnings) == 1 and "unavailable" in warnings[0]
                await asyncio.to_thread(redis_server.start)
                source.feed(["d"], None)
                await task
                got += await rest(listener)
        assert [d for _, d in got] == ["a", "b", "c", "d"] and ids_rise(got)
        assert len(warnings) == 2 and "is back" in warnings[1]

    run(main, timeout=30)


def test_redis_that_does_not_answer_at_start_is_one_line() -> None:
    async def main() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"
        with pytest.raises(RedisUnavailable, match=r"cannot reach redis redis://127\.0\.0\.1"):
            await Connection.open(url, lambda message: None)
        with pytest.raises(RedisUnavailable, match=r"redis://u:\*\*\*@"):
            await Connection.open(f"redis://u:secret@127.0.0.1:{free_port()}/0", print)

    run(main)


def test_closing_a_hub_mid_read_always_ends_its_reader(redis_server: RedisServer) -> None:
    # redis-py can swallow a cancel that lands inside one of its calls: the reader must end
    # wherever the cancel lands (connection.check_cancelled).
    async def main() -> None:
        async with connected(redis_server) as connection:
            for spins in (0, 1, 5, 50):
                feed = TopicFeed(connection, "t", warn=lambda message: None)
                hub = Hub.over(feed, StreamLog())
                hub.start()
                for _ in range(spins):
                    await asyncio.sleep(0)
                await asyncio.wait_for(hub.aclose(), 2)

    run(main)


def test_the_publishers_own_hub_gets_what_was_stored_with_its_ids_even_after_a_lost_reply(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        source = Gate()
        async with connected(redis_server) as connection:
            feed = TopicFeed(connection, "t", warn=lambda message: None, follow=False)
            own = Hub.over(feed, StreamLog())
            publisher = Publisher(
                connection, "t", source, instance="p", count=count_tokens, history=100,
                mirror=(feed, own),
            )  # fmt: skip
            await publisher.open()
            await feed.load(own)
            store = publisher._store
            lost = 0

            async def reply_lost(calls: list[Any]) -> list[list[bytes | int]]:
                nonlocal lost
                replies = await store(calls)
                if lost == 0:  # stored, but the reply never arrives
                    lost += 1
                    raise RedisConnectionError("Connection reset by peer")
                return replies

            publisher._store = reply_lost  # type: ignore[method-assign]
            async with instance(connection) as follower:
                theirs = follower.join()
                mine = own.join()
                task = asyncio.create_task(publisher.run())
                source.feed(["a", "b"], ["c"], None)
                await task
                got_mine, got_theirs = await rest(mine), await rest(theirs)
        assert lost == 1
        assert got_mine == got_theirs and [d for _, d in got_mine] == ["a", "b", "c"]
        assert own.ended and publisher.held == 0

    run(main)
