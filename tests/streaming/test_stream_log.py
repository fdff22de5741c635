"""The hub over a Redis stream's ids, without Redis: a StreamLog's ids and resume arithmetic,
and a Hub fed entry by entry as a topic's reader feeds it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay import SSEDecoder
from sserelay.metering.tokens import count_tokens
from sserelay.streaming.hub import HISTORY_TRUNCATED, Hub, Listener
from sserelay.streaming.log import StreamId, StreamLog, parse_stream_id
from sserelay.wire.frames import Frames

MS = 1_700_000_000_000
NOW = MS / 1000


def log_of(entries: Sequence[tuple[StreamId, Sequence[str]]], history: int = 1000) -> StreamLog:
    log = StreamLog(history, clock=lambda: NOW)
    for last_id, chunks in entries:
        log.add(log.entry(last_id, chunks, [count_tokens(c) for c in chunks]))
    return log


#: Three entries: a-b-c at MS-0..2, d at MS-3, e-f at (MS+5)-0..1.
ENTRIES = [((MS, 2), ["a", "b", "c"]), ((MS, 3), ["d"]), ((MS + 5, 1), ["e", "f"])]
IDS = [f"{MS}-0", f"{MS}-1", f"{MS}-2", f"{MS}-3", f"{MS + 5}-0", f"{MS + 5}-1"]


def events(frames: Frames | None) -> list[tuple[str | None, str]]:
    assert frames is not None
    return [(e.id, e.data) for e in SSEDecoder().decode(frames.payload)]


def test_each_event_carries_its_stream_id_and_the_entry_id_is_the_last_one() -> None:
    log = log_of(ENTRIES)
    assert events(log.read(1)) == list(zip(IDS, "abcdef", strict=True))
    assert log.last_id == (MS + 5, 1) and log.oldest_id == (MS, 0)
    assert log.is_last(IDS[-1]) and not log.is_last(IDS[-2]) and not log.is_last(None)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("1700000000000-3", (MS, 3)),
        (" 5-0 ", (5, 0)),
        ("0-0", (0, 0)),
        ("5", None),  # a number is not a stream id
        ("5-", None),
        ("-5", None),
        ("5-x", None),
        ("5-\u0661", None),  # a digit, but not ASCII
        (f"{2**64}-0", None),  # past Redis's 64 bits
        (None, None),
    ],
)
def test_parse_stream_id(value: str | None, parsed: StreamId | None) -> None:
    assert parse_stream_id(value) == parsed


@pytest.mark.parametrize(
    ("seen", "start"),
    [
        (None, 1),
        (IDS[0], 2),  # inside an entry: right after it
        (IDS[2], 4),  # an entry's own id: the next entry
        (f"{MS}-7", 5),  # between two entries (no such event): the first after it
        (f"{MS + 4}-0", 5),
        (IDS[5], 7),  # has everything so far
        ("1-0", 1),  # older than anything kept, nothing ever dropped: from the oldest
        ("42", 1),  # not a stream id: as if new
    ],
)
def test_resume_point(seen: str | None, start: int) -> None:
    assert log_of(ENTRIES).resume(seen) == (start, False)


@given(st.integers(0, len(IDS)))
def test_a_resume_from_any_event_gets_every_later_event_once(seen: int) -> None:
    log = log_of(ENTRIES)
    cursor, truncated = log.resume(IDS[seen - 1] if seen else None)
    frames = log.read(cursor)
    got = [] if frames is None else events(frames)
    assert got == list(zip(IDS, "abcdef", strict=True))[seen:] and not truncated


def test_a_resume_from_before_what_is_kept_is_told_it_was_truncated() -> None:
    log = log_of(ENTRIES, history=2)
    log.trim(log.head)
    assert log.oldest_id == (MS + 5, 0) and log.lost_before == (MS, 3)
    assert log.resume(IDS[0]) == (5, True)  # missed b..d
    assert log.resume(IDS[3]) == (5, False)  # has everything that was dropped
    assert log.resume(None) == (5, True)  # a new client: the start is gone


def test_ids_later_than_the_newest_are_ahead_unless_they_are_from_the_future() -> None:
    log = log_of(ENTRIES)
    assert log.ahead_of(f"{MS + 6}-0") == (MS + 6, 0)
    assert log.resume(f"{MS + 6}-0") == (log.head, False)  # waits for what it has not got
    assert log.ahead_of(IDS[-1]) is None and log.ahead_of(IDS[0]) is None
    far = f"{MS + 3_600_000}-0"  # an hour past the clock: no stream of ours sent it
    assert log.ahead_of(far) is None and log.resume(far) == (1, False)
    assert log.ahead_of("junk") is None


def test_entries_must_follow_the_newest_event() -> None:
    log = log_of(ENTRIES)
    with pytest.raises(ValueError, match="not after"):
        log.entry((MS + 5, 2), ["x", "y"], [1, 1])  # its first id would be MS+5-1 again
    with pytest.raises(ValueError, match="cannot hold"):
        log.entry((MS + 9, 0), ["x", "y"], [1, 1])  # two events need two sequence numbers
    batch = log.entry((MS + 9, 1), ["x", "y"], [1, 1])
    with pytest.raises(ValueError, match="head"):
        log_of([]).add(batch)


# --------------------------------------------------------------------------- a hub over a topic


class Topic:
    """A feed the test writes entries into, read from the start (as a topic's reader)."""

    on_demand = False
    invalid_utf8_bytes = 0

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[StreamId, list[str]] | None] = asyncio.Queue()

    def put(self, last_id: StreamId, chunks: list[str]) -> None:
        self.queue.put_nowait((last_id, chunks))

    async def run(self, hub: Hub) -> None:
        log = hub.log
        assert isinstance(log, StreamLog)
        while (item := await self.queue.get()) is not None:
            last_id, chunks = item
            hub.publish_batch(log.entry(last_id, chunks, [count_tokens(c) for c in chunks]))
        hub.end(None)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout=10))


async def rest(listener: Listener) -> list[tuple[str | None, str]]:
    decoder = SSEDecoder()
    return [(e.id, e.data) async for frames in listener for e in decoder.decode(frames.payload)]


def test_a_client_ahead_of_this_instance_skips_what_it_has_as_it_arrives() -> None:
    async def main() -> None:
        topic = Topic()
        hub = Hub.over(topic, StreamLog(clock=lambda: NOW))
        hub.start()
        topic.put((MS, 1), ["a", "b"])
        await asyncio.sleep(0.01)
        # Another instance already sent it up to MS-3: this one has read up to MS-1.
        ahead = hub.join(f"{MS}-3")
        behind = hub.join(f"{MS}-0")
        topic.put((MS, 2), ["c"])  # all of it already seen: skipped whole
        topic.put((MS, 5), ["d", "e"])  # d (MS-4) is the first it has not seen
        topic.queue.put_nowait(None)
        assert await rest(ahead) == [(f"{MS}-4", "d"), (f"{MS}-5", "e")]
        assert [i for i, _ in await rest(behind)] == [f"{MS}-{n}" for n in (1, 2, 4, 5)]
        assert hub.has_everything(f"{MS}-5") and not hub.has_everything(f"{MS}-4")
        await hub.aclose()

    run(main)


def test_a_gap_in_the_topic_is_said_to_every_listener() -> None:
    async def main() -> None:
        topic = Topic()
        hub = Hub.over(topic, StreamLog(clock=lambda: NOW))
        hub.start()
        listener = hub.join()
        topic.put((MS, 0), ["a"])
        first = await anext(listener)
        assert first.events == 1
        # What the reader does when it finds a gap: say so, then publish what follows it.
        hub.mark_truncated()
        hub.publish_batch(hub.log.entry((MS + 9, 0), ["z"], [1]))  # type: ignore[attr-defined]
        frames = await anext(listener)
        assert frames.payload.startswith(HISTORY_TRUNCATED) and frames.events == 1
        await hub.aclose()

    run(main)


def test_more_after_the_end_reopens_the_stream() -> None:
    async def main() -> None:
        topic = Topic()
        hub = Hub.over(topic, StreamLog(clock=lambda: NOW))
        hub.publish_batch(hub.log.entry((MS, 0), ["a"], [1]))  # type: ignore[attr-defined]
        hub.end(None, 2)
        assert hub.ended and hub.end_tokens == 2 and hub.has_everything(f"{MS}-0")
        hub.reopen()
        assert not hub.ended and hub.end_tokens == 0 and not hub.has_everything(f"{MS}-0")

    run(main)


class PacedTopic(Topic):
    """A topic feed that reads as TopicFeed does: at the pace of the fastest listener while
    any is connected, and on and on while none is."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0

    async def run(self, hub: Hub) -> None:
        log = hub.log
        assert isinstance(log, StreamLog)
        while True:
            if hub.listeners:
                await hub.demanded()
            item = await self.queue.get()
            assert item is not None
            self.read += 1
            last_id, chunks = item
            hub.publish_batch(log.entry(last_id, chunks, [1] * len(chunks)))


def test_a_topic_is_read_at_the_pace_of_its_listeners_and_on_while_nobody_listens() -> None:
    async def main() -> None:
        topic = PacedTopic()
        hub = Hub.over(topic, StreamLog(clock=lambda: NOW))
        hub.start()
        topic.put((MS, 0), ["a"])
        await asyncio.sleep(0.01)
        assert topic.read == 1  # nobody listens: the history stays fresh
        listener = hub.join()
        assert (await anext(listener)).events == 1  # "a": it has everything, and does not ask
        topic.put((MS, 1), ["b"])  # the read under way when it joined ends with it
        topic.put((MS, 2), ["c"])
        await asyncio.sleep(0.01)
        assert topic.read == 2  # "c" is held, as a source is, until a listener waits
        assert (await anext(listener)).events == 1  # "b", from the log: no wait
        assert (await anext(listener)).events == 1  # "c": it waited, so the reader read
        assert topic.read == 3
        topic.put((MS, 3), ["d"])
        await asyncio.sleep(0.01)
        assert topic.read == 3
        await listener.aclose()
        await asyncio.sleep(0.01)
        assert topic.read == 4  # the last listener left: reading goes on
        await hub.aclose()

    run(main)


def test_the_end_of_a_stream_is_heard_by_whoever_asked() -> None:
    ended: list[bool] = []
    hub = Hub.over(Topic(), StreamLog(clock=lambda: NOW))
    hub.on_end = lambda: ended.append(hub.ended)
    hub.end(None, 0)
    assert ended == [True]
