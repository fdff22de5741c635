"""Tests for the streaming contract, `sserelay.streaming.stream`, against an in-memory sink.

This is a unit test of the library contract (DESIGN.md, "The core contract"), not of the server:
`MemorySink` below plays the client connection. No sleeps: every wait is on a condition with a
deadline (STYLE.md, "Tests"), so a stream that buffers fails fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

import pytest

from sserelay.errors import ClientDisconnected, NoFlushError, SourceError
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.tokens import count_tokens
from sserelay.streaming.stream import (
    PING,
    SSE_HEADERS,
    EventSink,
    ExpressLane,
    Frames,
    encode_chunks,
    relay_frames,
    stream_sse,
)
from sserelay.wire.sse import Event, SSEDecoder
from tests.conftest import run_bounded as run

# --------------------------------------------------------------------------- helpers


class MemorySink:
    """An EventSink that keeps what each flush delivered, as a client would receive it.

    `disconnect_after=n`: the client goes away right after the n-th delivered flush (so
    `wait_disconnected()` returns, and later flushes report it gone). `refuse_flush=n`: the
    n-th flush() finds the client gone (False) without the watcher noticing. `block_flush=n`:
    the n-th flush() never completes (a stuck write) and the client goes away meanwhile."""

    def __init__(
        self,
        *,
        disconnect_after: int | None = None,
        refuse_flush: int | None = None,
        block_flush: int | None = None,
    ) -> None:
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.flushed: list[bytes] = []  # one entry per delivered flush
        self.flush_calls = 0
        self._pending: list[bytes] = []
        self._disconnect_after = disconnect_after
        self._refuse_flush = refuse_flush
        self._block_flush = block_flush
        self._gone = asyncio.Event()
        self._progress = asyncio.Event()

    async def start(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        assert self.headers is None, "start() called twice"
        self.headers = list(headers)

    def write(self, data: bytes) -> None:
        assert self.headers is not None, "write() before start()"
        self._pending.append(data)

    async def flush(self) -> bool:
        self.flush_calls += 1
        payload = b"".join(self._pending)
        self._pending.clear()
        if self._gone.is_set() or self.flush_calls == self._refuse_flush:
            return False  # the client is gone: nothing was delivered
        if self.flush_calls == self._block_flush:
            self._gone.set()
            await asyncio.Event().wait()  # stuck until cancelled
        await asyncio.sleep(0)  # handing bytes to a transport is a yield point
        self.flushed.append(payload)
        self._progress.set()
        if len(self.flushed) == self._disconnect_after:
            self._gone.set()
        return True

    async def wait_disconnected(self) -> None:
        await self._gone.wait()

    async def wait_flushed(self, count: int) -> None:
        """Return once `count` flushes have been delivered."""
        while len(self.flushed) < count:
            self._progress.clear()
            await self._progress.wait()

    def events(self) -> list[Event]:
        """What an SSE client decodes from everything delivered."""
        decoder = SSEDecoder()
        events = decoder.decode(b"".join(self.flushed))
        assert decoder.flush() == []
        return events


@dataclass
class SourceLog:
    """What a test source did: how many batches it produced, and whether it was closed."""

    produced: int = 0
    closed: bool = False


async def from_batches(batches: Sequence[Sequence[str]]) -> AsyncIterator[Sequence[str]]:
    for batch in batches:
        yield batch


def new_client() -> ClientMeter:
    return Meter().open_client("test")


# --------------------------------------------------------------------------- headers and events


def test_headers_are_exactly_the_design_ones() -> None:
    async def scenario() -> MemorySink:
        sink = MemorySink()
        await stream_sse(sink, from_batches([["x"]]), client=new_client())
        return sink

    sink = run(scenario())
    assert sink.headers is not None
    # DESIGN.md, "The core contract": the four headers, once each, no Content-Encoding
    assert len(sink.headers) == 4
    assert dict(sink.headers) == {
        b"content-type": b"text/event-stream",
        b"cache-control": b"no-cache",
        b"connection": b"keep-alive",
        b"x-accel-buffering": b"no",
    }
    assert sink.headers == list(SSE_HEADERS)


@pytest.mark.parametrize(
    ("batches", "kwargs", "ids"),
    [
        ([["a"], ["b", "c"], ["d"]], {}, ["1", "2", "3", "4"]),
        ([["a", "b"], ["c"]], {"first_id": 41}, ["41", "42", "43"]),
        ([["a"], ["b", "c"]], {"ids": False}, [None, None, None]),
        ([["a"], ["b"]], {"ids": False, "first_id": 9}, [None, None]),
    ],
    ids=["from-1", "first-id", "no-ids", "no-ids-ignores-first-id"],
)
def test_one_event_per_chunk_numbered_in_order(
    batches: list[list[str]], kwargs: dict[str, int | bool], ids: list[str | None]
) -> None:
    async def scenario() -> tuple[MemorySink, int]:
        sink = MemorySink()
        total = await stream_sse(
            sink,
            from_batches(batches),
            client=new_client(),
            ids=bool(kwargs.get("ids", True)),
            first_id=int(kwargs.get("first_id", 1)),
        )
        return sink, total

    sink, total = run(scenario())
    chunks = [chunk for batch in batches for chunk in batch]
    assert sink.events() == [Event(chunk, id=id_) for chunk, id_ in zip(chunks, ids, strict=True)]
    assert total == len(chunks)


def test_chunk_with_blank_line_is_one_event_and_injects_nothing() -> None:
    # DESIGN.md, "SSE rules": a chunk "can never end an event early or inject a field"
    async def scenario() -> MemorySink:
        sink = MemorySink()
        await stream_sse(
            sink, from_batches([["a\n\ndata: evil"], ["id: 99\rretry: 1"]]), client=new_client()
        )
        return sink

    sink = run(scenario())
    decoder = SSEDecoder()
    events = decoder.decode(b"".join(sink.flushed))
    assert events == [Event("a\n\ndata: evil", id="1"), Event("id: 99\nretry: 1", id="2")]
    assert decoder.retry is None
    assert decoder.last_event_id == "2"


def test_a_batch_goes_out_in_one_flush() -> None:
    # DESIGN.md: events ready together may share one send
    chunks = [f"token{i} " for i in range(50)]

    async def scenario() -> MemorySink:
        sink = MemorySink()
        await stream_sse(sink, from_batches([chunks, ["tail"]]), client=new_client())
        return sink

    sink = run(scenario())
    assert sink.flush_calls == 2
    assert len(sink.flushed) == 2
    decoder = SSEDecoder()
    assert len(decoder.decode(sink.flushed[0])) == 50
    assert decoder.decode(sink.flushed[1]) == [Event("tail", id="51")]


def test_empty_batches_send_nothing() -> None:
    async def scenario() -> MemorySink:
        sink = MemorySink()
        await stream_sse(sink, from_batches([[], ["a"], [], []]), client=new_client())
        return sink

    sink = run(scenario())
    assert sink.flush_calls == 1
    assert sink.events() == [Event("a", id="1")]


# --------------------------------------------------------------------------- live flushing


def test_live_flush_gate_each_batch_reaches_the_client_before_the_next_is_read() -> None:
    # STYLE.md, "Tests": the source yields batch 1 and then blocks until the test has seen
    # batch 1 delivered. A stream that waited for more before flushing never lets it through.
    gate = asyncio.Event()
    log = SourceLog()

    async def source() -> AsyncIterator[list[str]]:
        log.produced += 1
        yield ["first token"]
        await gate.wait()
        log.produced += 1
        yield ["second"]

    async def scenario() -> tuple[MemorySink, int]:
        sink = MemorySink()
        streaming = asyncio.create_task(stream_sse(sink, source(), client=new_client()))
        await sink.wait_flushed(1)
        assert sink.events() == [Event("first token", id="1")]
        assert log.produced == 1  # delivered while the source is still blocked
        gate.set()
        return sink, await streaming

    sink, total = run(scenario())
    assert sink.events() == [Event("first token", id="1"), Event("second", id="2")]
    assert total == 3


@pytest.mark.parametrize("heartbeat", [None, 0.05])
def test_returns_the_total_and_meters_exactly_what_was_written(heartbeat: float | None) -> None:
    batches = [["hello world", "  "], ["中文 text\nmore"], ["😀"]]
    client = new_client()

    async def scenario() -> tuple[MemorySink, int]:
        sink = MemorySink()
        total = await stream_sse(sink, from_batches(batches), client=client, heartbeat=heartbeat)
        return sink, total

    sink, total = run(scenario())
    expected_tokens = sum(count_tokens(chunk) for batch in batches for chunk in batch)
    assert total == expected_tokens == 6
    assert client.tokens == expected_tokens
    assert client.events == 4
    assert client.bytes == sum(len(payload) for payload in sink.flushed)
    assert client.first_event_at is not None
    assert client.active  # closing the client is the caller's job


def test_count_is_pluggable() -> None:
    client = new_client()

    async def scenario() -> int:
        return await stream_sse(
            MemorySink(), from_batches([["ab c"], ["中😀"]]), client=client, count=len
        )

    assert run(scenario()) == 6
    assert client.tokens == 6


# --------------------------------------------------------------------------- disconnects


def test_client_gone_stops_an_endless_source_and_bills_what_was_flushed() -> None:
    log = SourceLog()

    async def endless() -> AsyncIterator[list[str]]:
        try:
            while True:
                await asyncio.sleep(0)  # an upstream read
                log.produced += 1
                yield [f"word{log.produced} more"]
        finally:
            log.closed = True

    client = new_client()

    async def scenario() -> tuple[MemorySink, ClientDisconnected]:
        sink = MemorySink(disconnect_after=2)
        with pytest.raises(ClientDisconnected) as excinfo:
            await stream_sse(sink, endless(), client=client)
        assert log.closed, "the source was not closed when the client left"
        return sink, excinfo.value

    sink, disconnected = run(scenario())
    assert len(sink.flushed) == 2
    assert disconnected.tokens == 4 == client.tokens
    assert client.events == 2
    assert client.bytes == sum(len(payload) for payload in sink.flushed)
    assert log.produced <= 3  # at most one batch in flight when the client left


@pytest.mark.parametrize("heartbeat", [None, 0.05])
def test_client_gone_while_the_source_waits_closes_it(heartbeat: float | None) -> None:
    log = SourceLog()
    never = asyncio.Event()

    async def quiet_upstream() -> AsyncIterator[list[str]]:
        try:
            yield ["one two"]
            yield ["three"]
            await never.wait()  # the model is thinking when the client leaves
            yield ["never sent"]
        finally:
            log.closed = True

    client = new_client()

    async def scenario() -> tuple[MemorySink, ClientDisconnected]:
        sink = MemorySink(disconnect_after=2)
        with pytest.raises(ClientDisconnected) as excinfo:
            await stream_sse(sink, quiet_upstream(), client=client, heartbeat=heartbeat)
        assert log.closed, "the source was not closed when the client left"
        return sink, excinfo.value

    sink, disconnected = run(scenario())
    assert sink.events() == [Event("one two", id="1"), Event("three", id="2")]
    assert disconnected.tokens == 3 == client.tokens
    assert client.events == 2
    assert "3 tokens" in str(disconnected)


def test_client_gone_during_a_stuck_write_closes_the_source() -> None:
    log = SourceLog()

    async def endless() -> AsyncIterator[list[str]]:
        try:
            while True:
                log.produced += 1
                yield ["a b"]
        finally:
            log.closed = True

    client = new_client()

    async def scenario() -> ClientDisconnected:
        sink = MemorySink(block_flush=3)
        with pytest.raises(ClientDisconnected) as excinfo:
            await stream_sse(sink, endless(), client=client)
        assert excinfo.value.tokens == 4 == client.tokens  # the stuck write is not billed
        assert log.produced == 3
        assert log.closed, "the source was not closed when the client left"
        return excinfo.value

    run(scenario())


def test_flush_refused_is_client_disconnected_and_that_write_is_not_billed() -> None:
    client = new_client()

    async def scenario() -> tuple[MemorySink, ClientDisconnected]:
        sink = MemorySink(refuse_flush=2)
        with pytest.raises(ClientDisconnected) as excinfo:
            await stream_sse(sink, from_batches([["a b"], ["c d e"], ["f"]]), client=client)
        return sink, excinfo.value

    sink, disconnected = run(scenario())
    assert sink.flush_calls == 2
    assert sink.events() == [Event("a b", id="1")]
    assert disconnected.tokens == 2 == client.tokens
    assert client.events == 1
    assert client.bytes == len(sink.flushed[0])


# --------------------------------------------------------------------------- sinks and sources


class NoFlushSink:
    """A response writer that can only write: events would sit in its buffer."""

    def __init__(self) -> None:
        self.started = False

    async def start(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.started = True

    def write(self, data: bytes) -> None:
        raise AssertionError("nothing may be written to a sink that cannot flush")

    async def wait_disconnected(self) -> None:
        await asyncio.Event().wait()


class FlushAttributeSink(NoFlushSink):
    flush = None  # present, but not something one can call


@pytest.mark.parametrize("sink_type", [NoFlushSink, FlushAttributeSink])
def test_sink_without_flush_is_no_flush_error(sink_type: type[NoFlushSink]) -> None:
    sink = sink_type()
    log = SourceLog()

    async def source() -> AsyncIterator[list[str]]:
        log.produced += 1
        yield ["x"]

    async def scenario() -> None:
        # the point of the test is a sink that does not meet the EventSink protocol
        await stream_sse(cast(EventSink, sink), source(), client=new_client())

    with pytest.raises(NoFlushError) as excinfo:
        run(scenario())
    assert str(excinfo.value) == "sserelay: response writer does not support flushing"
    assert not sink.started  # refused before any header went out
    assert log.produced == 0


def test_heartbeat_pings_an_idle_stream_then_the_event_follows() -> None:
    gate = asyncio.Event()

    async def source() -> AsyncIterator[list[str]]:
        yield ["first"]
        await gate.wait()
        yield ["second"]

    client = new_client()

    async def scenario() -> MemorySink:
        sink = MemorySink()
        streaming = asyncio.create_task(stream_sse(sink, source(), client=client, heartbeat=0.05))
        await sink.wait_flushed(3)  # the first event and two pings, while the source blocks
        gate.set()
        await streaming
        return sink

    sink = run(scenario())
    first, *pings, last = sink.flushed
    assert PING == b": ping\n\n"
    assert len(pings) >= 2
    assert all(ping == PING for ping in pings)
    assert SSEDecoder().decode(first) == [Event("first", id="1")]
    assert SSEDecoder().decode(last) == [Event("second", id="2")]
    assert sink.events() == [Event("first", id="1"), Event("second", id="2")]
    # pings are not events and carry no tokens; the meter bills only the events' bytes
    assert (client.events, client.tokens) == (2, 2)
    assert client.bytes == len(first) + len(last)


class SlowSink(MemorySink):
    """Every flush takes `delay` seconds (a slow client); records how many overlap."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0

    async def flush(self) -> bool:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await super().flush()
        finally:
            self.in_flight -= 1


def test_a_ping_and_an_event_are_never_flushed_at_once() -> None:
    async def source() -> AsyncIterator[list[str]]:
        for i in range(6):
            await asyncio.sleep(0.03)
            yield [f"event {i}"]

    client = new_client()
    sink = SlowSink(delay=0.05)  # each write outlasts the heartbeat interval
    run(stream_sse(sink, source(), client=client, heartbeat=0.02))
    assert sink.most_in_flight == 1
    assert [e.data for e in sink.events()] == [f"event {i}" for i in range(6)]
    assert client.events == 6


def test_a_failing_ping_is_raised_not_taken_for_a_gone_client() -> None:
    class PingFails(MemorySink):
        async def flush(self) -> bool:
            if self._pending == [PING]:
                raise OSError("write failed")
            return await super().flush()

    async def idle() -> AsyncIterator[list[str]]:
        yield ["only"]
        await asyncio.Event().wait()

    with pytest.raises(OSError, match="write failed"):
        run(stream_sse(PingFails(), idle(), client=new_client(), heartbeat=0.02))


@pytest.mark.parametrize("heartbeat", [None, 0.05])
def test_source_error_propagates(heartbeat: float | None) -> None:
    client = new_client()

    async def failing() -> AsyncIterator[list[str]]:
        yield ["before the error"]
        raise SourceError("cannot read input.txt: Input/output error")

    async def scenario() -> MemorySink:
        sink = MemorySink()
        with pytest.raises(SourceError, match=r"cannot read input\.txt"):
            await stream_sse(sink, failing(), client=client, heartbeat=heartbeat)
        return sink

    sink = run(scenario())
    assert sink.events() == [Event("before the error", id="1")]
    assert (client.events, client.tokens) == (1, 3)


# ------------------------------------------------------------------ relay_frames, encode_chunks


async def from_frames(frames: Sequence[Frames]) -> AsyncIterator[Frames]:
    for item in frames:
        yield item


def test_relay_frames_writes_each_frames_in_one_flush() -> None:
    frames = [
        Frames(b"data: x\n\n", 1, 1),
        Frames(b"id: 9\ndata: a b\n\nid: 10\ndata: c\n\n", 2, 3),
    ]
    client = new_client()

    async def scenario() -> tuple[MemorySink, int]:
        sink = MemorySink()
        return sink, await relay_frames(sink, from_frames(frames), client=client)

    sink, total = run(scenario())
    assert sink.flushed == [item.payload for item in frames]
    assert sink.headers == list(SSE_HEADERS)
    assert total == 4 == client.tokens
    assert client.events == 3
    assert client.bytes == sum(len(item.payload) for item in frames)


def test_relay_frames_sends_the_headers_it_is_given() -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"x-extra", b"1")]

    async def scenario() -> MemorySink:
        sink = MemorySink()
        await relay_frames(sink, from_frames([]), client=new_client(), headers=headers)
        return sink

    sink = run(scenario())
    assert sink.headers == headers
    assert sink.flushed == []


async def collect(frames: AsyncIterator[Frames]) -> list[Frames]:
    return [item async for item in frames]


@pytest.mark.parametrize(
    ("batches", "kwargs", "expected"),
    [
        (
            [["a b"], ["c", "d e f"]],
            {},
            [
                Frames(b"id: 1\ndata: a b\n\n", 1, 2),
                Frames(b"id: 2\ndata: c\n\nid: 3\ndata: d e f\n\n", 2, 4),
            ],
        ),
        ([[], ["x"], []], {"first_id": 7}, [Frames(b"id: 7\ndata: x\n\n", 1, 1)]),
        ([["x y"]], {"ids": False}, [Frames(b"data: x y\n\n", 1, 2)]),
        ([["a\nb"]], {"ids": False}, [Frames(b"data: a\ndata: b\n\n", 1, 2)]),
        ([[""]], {}, [Frames(b"id: 1\ndata: \n\n", 1, 0)]),
    ],
    ids=["numbered", "empty-batches-skipped", "no-ids", "multi-line", "empty-chunk"],
)
def test_encode_chunks(
    batches: list[list[str]], kwargs: dict[str, int | bool], expected: list[Frames]
) -> None:
    frames = encode_chunks(
        from_batches(batches),
        ids=bool(kwargs.get("ids", True)),
        first_id=int(kwargs.get("first_id", 1)),
    )
    assert run(collect(frames)) == expected


def test_encode_chunks_counts_with_the_given_count() -> None:
    frames = encode_chunks(from_batches([["ab", "cde"]]), count=len)
    assert run(collect(frames)) == [Frames(b"id: 1\ndata: ab\n\nid: 2\ndata: cde\n\n", 2, 5)]


# --------------------------------------------------------------------------- the express lane


class ExpressMemorySink(MemorySink):
    """A MemorySink that also takes bytes synchronously while `open_now` says so."""

    def __init__(self) -> None:
        super().__init__()
        self.open_now = True
        self.written_now: list[bytes] = []

    def ready(self) -> bool:
        return self.open_now and not self._gone.is_set()

    def write_now(self, data: bytes) -> bool:
        assert self.ready()
        self.written_now.append(data)
        self.flushed.append(data)
        return True


def test_the_express_lane_writes_and_bills_while_the_pump_waits() -> None:
    lanes: list[ExpressLane] = []
    release = asyncio.Event()

    async def source() -> AsyncIterator[Frames]:
        yield Frames(b"data: pumped\n\n", 1, 2, 1)
        await release.wait()

    async def scenario() -> tuple[ExpressMemorySink, ClientMeter, list[bool]]:
        sink, client = ExpressMemorySink(), new_client()
        relay = asyncio.ensure_future(
            relay_frames(sink, source(), client=client, express=lanes.append)
        )
        await sink.wait_flushed(1)
        (lane,) = lanes
        seen = [lane.ready()]
        lane.write(Frames(b"data: express\n\n", 1, 3, 2))
        sink.open_now = False  # a paused transport: the pump's way, which waits
        seen.append(lane.ready())
        sink.open_now = True
        release.set()
        await relay
        seen.append(lane.ready())  # the stream is over: nothing more goes this way
        return sink, client, seen

    sink, client, seen = run(scenario())
    assert seen == [True, False, False]
    assert sink.flushed == [b"data: pumped\n\n", b"data: express\n\n"]
    assert sink.written_now == [b"data: express\n\n"]
    assert (client.events, client.tokens, client.tail) == (2, 5, 2)
    assert client.bytes == len(b"data: pumped\n\ndata: express\n\n")


def test_no_express_lane_while_a_ping_is_written() -> None:
    lanes: list[ExpressLane] = []
    during_ping: list[bool] = []

    class PingWatch(ExpressMemorySink):
        async def flush(self) -> bool:
            if self._pending == [PING]:
                during_ping.append(lanes[0].ready())
            return await super().flush()

    async def idle() -> AsyncIterator[Frames]:
        yield Frames(b"data: 1\n\n", 1, 1)
        await asyncio.Event().wait()

    async def scenario() -> None:
        sink = PingWatch()
        relay = asyncio.ensure_future(
            relay_frames(sink, idle(), client=new_client(), heartbeat=0.01, express=lanes.append)
        )
        while not during_ping:
            await asyncio.sleep(0.01)
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay

    run(scenario())
    assert during_ping[0] is False


def test_no_express_lane_with_a_gate_a_lazy_start_or_a_sink_without_one() -> None:
    lanes: list[ExpressLane] = []

    async def scenario() -> None:
        await relay_frames(MemorySink(), from_frames([]), client=new_client(), express=lanes.append)
        await relay_frames(
            ExpressMemorySink(),
            from_frames([]),
            client=new_client(),
            lazy_start=True,
            express=lanes.append,
        )

    run(scenario())
    assert lanes == []
