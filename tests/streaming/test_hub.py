"""The broadcast hub without sockets: the event log's history and resume arithmetic,
and the hub's reader, listeners, cut-off and pacing over in-memory sources."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay import SSEDecoder
from sserelay.errors import SourceError
from sserelay.metering.tokens import count_tokens
from sserelay.sources.pacing import Pacer
from sserelay.sources.text import Batch, TimedBatch
from sserelay.streaming.hub import HISTORY_TRUNCATED, Hub, Listener
from sserelay.streaming.log import BatchFrames, EventLog, parse_event_id
from sserelay.wire.frames import Frames
from sserelay.wire.sse import encode_data

# --------------------------------------------------------------------------- the event log


def log_of(batches: Sequence[Sequence[str]], history: int = 1000) -> EventLog:
    log = EventLog(history)
    for batch in batches:
        log.append(batch, [count_tokens(chunk) for chunk in batch])
    return log


def expected(chunks: list[str], start: int) -> Frames:
    """Events `start`... of the numbered `chunks`, encoded one by one."""
    tail = list(enumerate(chunks, 1))[start - 1 :]
    payload = b"".join(encode_data(chunk, str(i)) for i, chunk in tail)
    return Frames(payload, len(tail), sum(count_tokens(chunk) for _, chunk in tail))


batches_strategy = st.lists(
    st.lists(st.text(alphabet="ab \n", max_size=6), min_size=1, max_size=5), max_size=6
)


@given(batches_strategy, st.data())
def test_a_read_from_any_point_is_every_later_event_once_and_billed_exactly(
    batches: list[list[str]], data: st.DataObject
) -> None:
    log = log_of(batches)
    chunks = [chunk for batch in batches for chunk in batch]
    assert log.head == len(chunks) + 1
    cursor = data.draw(st.integers(1, log.head))
    frames = log.read(cursor)
    if cursor == log.head:
        assert frames is None
    else:
        assert frames == expected(chunks, cursor)


@given(st.lists(st.text(alphabet="ab \n", max_size=6), min_size=1, max_size=8), st.data())
def test_the_first_events_of_a_batch_are_cut_at_an_event(
    batch: list[str], data: st.DataObject
) -> None:
    log = log_of([batch])
    skip = data.draw(st.integers(0, len(batch) - 1))
    frames = log.read(1 + skip)
    assert isinstance(frames, BatchFrames)
    count = data.draw(st.integers(1, len(batch) - skip))
    numbered = list(enumerate(batch, 1))[skip : skip + count]
    payload = b"".join(encode_data(chunk, str(i)) for i, chunk in numbered)
    tokens = sum(count_tokens(chunk) for _, chunk in numbered)
    assert frames.head(count) == Frames(payload, count, tokens)


def test_a_batch_led_by_a_notice_gives_it_with_its_first_events() -> None:
    log = log_of([["a", "b c", "d"]])
    frames = log.read(1)
    assert isinstance(frames, BatchFrames)
    part = frames.led_by(b"retry: 1000\n").head(2)
    assert part == Frames(b"retry: 1000\n" + expected(["a", "b c", "d"], 1).payload[:32], 2, 3)


def test_a_client_keeping_up_gets_the_batch_payload_itself() -> None:
    log = log_of([["a", "b"]])
    batch_payload = log.read(1)
    log.append(["c"], [1])
    frames = log.read(3)
    assert frames is not None and batch_payload is not None
    assert frames.payload is log.read(3).payload  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("last_event_id", "start"),
    [
        (None, (1, False)),  # a new client: from the first event
        (0, (1, False)),
        (3, (4, False)),  # mid-batch: right after it
        (4, (5, False)),
        (5, (6, False)),  # has everything: waits for the next
        (6, (1, False)),  # an id this stream never sent: as if new
        (99, (1, False)),
    ],
)
def test_resume_point(last_event_id: int | None, start: tuple[int, bool]) -> None:
    log = log_of([["a", "b"], ["c", "d", "e"]])
    assert log.start(last_event_id) == start


def test_a_resume_from_a_dropped_event_starts_at_the_oldest_kept_and_says_so() -> None:
    log = log_of([["a"], ["b"], ["c"], ["d"], ["e"]], history=2)
    log.trim(log.head)
    assert (log.oldest, log.kept) == (4, 2)
    assert log.start(1) == (4, True)
    assert log.start(None) == (4, True)
    assert log.start(3) == (4, False)
    with pytest.raises(ValueError, match="no longer kept"):
        log.read(2)


def test_trim_keeps_the_history_and_what_a_client_still_needs() -> None:
    log = log_of([["a"], ["b"], ["c"], ["d"], ["e"]], history=1)
    log.trim(floor=2)  # a client has yet to take event 2
    assert log.oldest == 2
    log.trim(floor=6)
    assert log.oldest == 5


def test_trim_drops_whole_batches_only() -> None:
    log = log_of([["a", "b", "c"], ["d"]], history=2)
    log.trim(log.head)
    assert log.oldest == 1  # event 3 is in the history, so its batch stays
    assert log.read(3) == expected(["a", "b", "c", "d"], 3)


def test_no_history_keeps_nothing_nobody_needs() -> None:
    log = log_of([["a", "b"]], history=0)
    log.trim(log.head)
    assert (log.oldest, log.kept, log.head) == (3, 0, 3)
    assert log.start(None) == (3, True)


def test_without_ids_events_carry_none() -> None:
    log = EventLog(ids=False)
    log.append(["a", "b c"], [1, 2])
    assert log.read(2) == Frames(b"data: b c\n\n", 1, 2)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, None),
        ("7", 7),
        (" 7 ", 7),
        ("0", 0),
        ("", None),
        ("-1", None),
        ("x", None),
        ("\u0661", None),  # a digit, but not ASCII
        ("1.5", None),
    ],
)
def test_parse_event_id(value: str | None, parsed: int | None) -> None:
    assert parse_event_id(value) == parsed


# --------------------------------------------------------------------------- the hub


class Gate:
    """A source the test feeds batch by batch; counts how many were taken from it."""

    name = "gate"
    timed = False
    invalid_utf8_bytes = 0

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Batch | Exception | None] = asyncio.Queue()
        self.taken = 0
        self.closed = False

    def feed(self, *items: Batch | Exception | None) -> None:
        for item in items:
            self.queue.put_nowait(item)

    async def batches(self) -> AsyncIterator[Batch]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                self.taken += 1
                yield item
        finally:
            self.closed = True


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout=10))


async def take(listener: Listener, events: int) -> list[tuple[str | None, str]]:
    """Read `events` events from `listener`, decoded as a client would."""
    decoder = SSEDecoder()
    got: list[tuple[str | None, str]] = []
    while len(got) < events:
        frames = await anext(listener)
        got += [(e.id, e.data) for e in decoder.decode(frames.payload)]
    return got


async def rest(listener: Listener) -> list[tuple[str | None, str]]:
    decoder = SSEDecoder()
    return [(e.id, e.data) async for frames in listener for e in decoder.decode(frames.payload)]


def numbered(words: Sequence[str], first: int = 1) -> list[tuple[str | None, str]]:
    return [(str(i), word) for i, word in enumerate(words, first)]


def test_three_listeners_late_and_resumed_get_every_event_once() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens)
        first = hub.join()
        gate.feed(["a", "b"], ["c"])
        assert await take(first, 3) == numbered("abc")
        late = hub.join()  # from the history
        resumed = hub.join("2")  # saw 1 and 2
        gate.feed(["d", "e"], ["f"], None)
        assert await rest(first) == numbered("def", 4)
        assert await rest(late) == numbered("abcdef")
        assert await rest(resumed) == numbered("cdef", 3)
        await hub.aclose()

    run(main)


def test_the_source_is_read_only_when_a_listener_waits_for_more() -> None:
    async def main() -> None:
        gate = Gate()
        gate.feed(["a"], ["b"], ["c"])
        hub = Hub(gate, count=count_tokens)
        assert gate.taken == 0  # nobody asked yet
        listener = hub.join()
        assert await take(listener, 1) == numbered("a")
        await asyncio.sleep(0.05)
        assert gate.taken == 1  # the listener has not asked again: paused, not drained
        await listener.aclose()
        await asyncio.sleep(0.05)
        assert gate.taken == 1
        await hub.aclose()
        assert gate.closed

    run(main)


def test_a_listener_that_stops_taking_is_cut_off_and_the_others_go_on() -> None:
    async def main() -> None:
        gate = Gate()
        cuts: list[str] = []
        hub = Hub(gate, count=count_tokens, history=2, max_lag=5)
        fast = hub.join(on_cut=lambda: cuts.append("fast"))
        stuck = hub.join(on_cut=lambda: cuts.append("stuck"))
        words = [f"w{i}" for i in range(40)]
        gate.feed(*([w] for w in words), None)
        assert await rest(fast) == numbered(words)
        assert cuts == ["stuck"] and stuck.cut and not fast.cut
        assert hub.listeners == 1
        # The stuck listener no longer holds events back: the log is the history again.
        assert hub.log.kept == 2
        # And it ends at once if it ever asks.
        with pytest.raises(StopAsyncIteration):
            await anext(stuck)
        await hub.aclose()

    run(main)


def test_one_big_batch_never_cuts_a_listener_that_had_everything() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens, history=0, max_lag=3)
        one, two = hub.join(), hub.join()
        gate.feed(list("abcdefghij"), ["k"], None)
        assert await take(one, 10) == numbered("abcdefghij")
        assert await take(two, 10) == numbered("abcdefghij")
        assert await rest(one) == await rest(two) == numbered("k", 11)
        assert not one.cut and not two.cut

    run(main)


def test_a_late_joiner_past_the_history_is_told_it_was_truncated() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens, history=2)
        first = hub.join()
        gate.feed(*([w] for w in "abcde"))
        assert await take(first, 5) == numbered("abcde")
        late = hub.join("1")
        frames = await anext(late)
        assert frames.payload.startswith(HISTORY_TRUNCATED)
        assert (frames.events, frames.tokens) == (2, 2)
        assert SSEDecoder().decode(frames.payload)[0].id == "4"
        await hub.aclose()

    run(main)


def test_truncation_is_said_at_once_even_with_nothing_to_send() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens, history=0)
        first = hub.join()
        gate.feed(["a"])
        await take(first, 1)
        late = hub.join()
        assert await anext(late) == Frames(HISTORY_TRUNCATED, 0, 0)
        await hub.aclose()

    run(main)


def test_a_source_error_reaches_every_listener_after_what_was_read() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens)
        one, two = hub.join(), hub.join()
        gate.feed(["a"], SourceError("cannot read stdin: Input/output error"))
        assert await take(one, 1) == numbered("a")
        for listener in (one, two):
            with pytest.raises(SourceError, match="Input/output error"):
                await rest(listener)
        assert hub.ended and hub.error is not None

    run(main)


def test_has_everything_only_after_the_end() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens)
        listener = hub.join()
        gate.feed(["a", "b"])
        await take(listener, 2)
        assert not hub.has_everything("2")  # not ended: more may come
        gate.feed(None)
        assert await rest(listener) == []
        assert hub.has_everything("2")
        assert not hub.has_everything("1") and not hub.has_everything(None)

    run(main)


def test_per_event_tokens_for_a_resume_inside_a_batch() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens)
        first = hub.join()
        gate.feed(["one two", "three", "four five six"], None)
        await rest(first)
        frames = [f async for f in hub.join("1")]
        assert sum(f.tokens for f in frames) == 4
        assert sum(f.events for f in frames) == 2

    run(main)


def test_tokens_counted_at_the_end_go_to_every_listener_that_took_the_last_event() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens, count_end=lambda: 3)
        early = hub.join()
        gate.feed(["a b"], ["c"])
        await take(early, 2)
        waiting = hub.join("2")  # has everything so far: takes nothing more
        gate.feed(None)
        assert [f async for f in early] == [Frames(b"", 0, 3)]  # no bytes: they went with "c"
        assert [f async for f in waiting] == []
        late = [f async for f in hub.join()]  # from the history: the events, then the end
        assert late[-1] == Frames(b"", 0, 3)
        assert (sum(f.events for f in late), sum(f.tokens for f in late)) == (2, 6)
        assert hub.end_tokens == 3

    run(main)


def test_a_failed_source_counts_nothing_at_the_end() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens, count_end=lambda: 3)
        listener = hub.join()
        gate.feed(["a"], SourceError("cannot read stdin: Input/output error"))
        assert await take(listener, 1) == numbered("a")
        with pytest.raises(SourceError):
            await rest(listener)
        assert hub.end_tokens == 0

    run(main)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def test_paced_hub_publishes_events_one_by_one_on_schedule() -> None:
    async def main() -> None:
        gate = Gate()
        fake = FakeTime()
        hub = Hub(
            gate, count=count_tokens, pacer=Pacer(rate=10), clock=fake.clock, sleep=fake.sleep
        )
        listener = hub.join()
        gate.feed(["a b", "c", "d e f"], None)
        sizes = [f.events async for f in listener]
        assert sizes == [1, 1, 1]  # one flush per event, not one per read
        assert fake.sleeps == [0.1, 0.3]

    run(main)


def test_realtime_hub_follows_recorded_offsets() -> None:
    async def main() -> None:
        gate = Gate()
        fake = FakeTime()
        pacer = Pacer(realtime=True)
        hub = Hub(gate, count=count_tokens, pacer=pacer, clock=fake.clock, sleep=fake.sleep)
        listener = hub.join()
        gate.feed(TimedBatch(0.5, ["a"]), TimedBatch(0.75, ["b"]), TimedBatch(2.0, ["c"]), None)
        assert await rest(listener) == numbered("abc")
        assert fake.sleeps == [0.5, 0.25, 1.25]

    run(main)


def test_closing_the_hub_closes_the_source_mid_read() -> None:
    async def main() -> None:
        gate = Gate()
        hub = Hub(gate, count=count_tokens)
        listener = hub.join()
        waiting: asyncio.Task[Any] = asyncio.create_task(anext(listener))
        await asyncio.sleep(0.01)
        await hub.aclose()
        assert gate.closed
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    run(main)
