"""stream_sse(): write chunks to one client as SSE events, flushed at once, metered as they go.

The sink is the client's connection, seen through four calls: `start()` sends
the headers, `write()` buffers bytes, `flush()` hands what was written to the
connection and says whether the client was still there, `wait_disconnected()`
returns when the client goes away. A batch of chunks that were ready together
goes out in one flush; no chunk ever waits for a later one.

A write is billed as soon as the connection accepted it, whatever happens next: a
sink that may be cancelled after handing bytes over (while it yields to learn of a
disconnect) says so with `accepted`, and the write is billed before the cancel goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import NoReturn, Protocol, cast

from sserelay.errors import BudgetExhausted, ClientDisconnected, Interrupted, NoFlushError
from sserelay.metering.meter import ClientMeter
from sserelay.metering.tokens import count_tokens
from sserelay.streaming.gate import BudgetGate
from sserelay.wire.frames import Frames
from sserelay.wire.sse import encode_batch

__all__ = [
    "SSE_HEADERS",
    "EventSink",
    "ExpressLane",
    "ExpressSink",
    "Frames",
    "encode_chunks",
    "relay_frames",
    "stream_sse",
]

#: The response headers of every event stream (DESIGN.md). `X-Accel-Buffering`
#: stops nginx-style proxies from buffering; no Content-Encoding, ever.
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
)

PING = b": ping\n\n"


class EventSink(Protocol):
    """A client connection that stream_sse() writes to."""

    async def start(self, headers: Sequence[tuple[bytes, bytes]]) -> None: ...

    def write(self, data: bytes) -> None: ...

    async def flush(self) -> bool:
        """Send what was written. False if the client had gone away (nothing was delivered).

        A sink that can be cancelled inside flush() after the connection took the bytes
        sets an `accepted` attribute to True before its last await: the write is then billed."""
        ...

    async def wait_disconnected(self) -> None: ...


class ExpressSink(EventSink, Protocol):
    """An EventSink that can also take bytes synchronously, from a callback (an ExpressLane)."""

    def ready(self) -> bool:
        """Whether write_now() would hand bytes to the connection now."""
        ...

    def write_now(self, data: bytes) -> bool:
        """Hand `data` to the connection now (only right after ready() said True)."""
        ...


class ExpressLane:
    """The way around the pump: a source that learns of its data in a callback (an
    upstream connection's) writes and bills a Frames there, with no task to wake, no
    flush to await, while the pump waits for its next Frames with nothing before it
    (the source's to ensure: then nothing can be written out of order).

    `ready()` says whether it may, right now: the stream is on, no ping is being written,
    and the connection takes bytes at once (else the Frames goes to the pump as usual,
    which waits for a paused connection). `write(item)` then writes and bills `item` at
    once, as the pump would (a write billed once the connection took it), before the
    callback returns. Only for a stream with no budget gate and no lazy start."""

    __slots__ = ("_activity", "_client", "_ready", "_time", "_write_now", "open")

    def __init__(self, sink: ExpressSink, client: ClientMeter, activity: _Activity) -> None:
        self._ready = sink.ready
        self._write_now = sink.write_now
        self._client = client
        self._activity = activity
        self._time = asyncio.get_running_loop().time
        #: False once the stream is ending: nothing more goes this way.
        self.open = True

    def ready(self) -> bool:
        activity = self._activity
        return self.open and not activity.flushing and not activity.lock.locked() and self._ready()

    def write(self, item: Frames) -> None:
        """Write and bill `item` now. Only right after ready() said True, with no await
        in between: the connection then takes it whole, and it is the client's."""
        if item.payload:
            if not self._write_now(item.payload):
                raise RuntimeError("an express write was refused right after ready()")
            self._activity.last = self._time()
        self._client.record(item.events, item.tokens, len(item.payload), item.pending)


class _Gone(Exception):
    """The sink reported the client gone during a flush."""


class _Exhausted(Exception):
    """The gate cut the stream: the budget is spent (after its error event, if started)."""

    def __init__(self, started: bool) -> None:
        super().__init__("budget exhausted")
        self.started = started


async def encode_chunks(
    batches: AsyncIterable[Sequence[str]],
    *,
    count: Callable[[str], int] = count_tokens,
    ids: bool = True,
    first_id: int = 1,
) -> AsyncIterator[Frames]:
    """One event per chunk, numbered from `first_id` unless `ids` is false;
    each batch of chunks that were ready together becomes one Frames."""
    next_id = first_id
    source = aiter(batches)
    try:
        async for batch in source:
            if not batch:
                continue
            tokens = sum(map(count, batch))
            payload, _ = encode_batch(batch, next_id if ids else None)
            next_id += len(batch)
            yield Frames(payload, len(batch), tokens)

    finally:
        await _aclose(source)


async def _aclose(iterator: object) -> None:
    """Close an async iterator that has an `aclose()` (an async generator does)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def stream_sse(
    sink: EventSink,
    batches: AsyncIterable[Sequence[str]],
    *,
    client: ClientMeter,
    count: Callable[[str], int] = count_tokens,
    ids: bool = True,
    first_id: int = 1,
    heartbeat: float | None = None,
    stop: asyncio.Future[None] | None = None,
) -> int:
    """Stream every chunk of `batches` to `sink` as one SSE event each.

    Each batch is encoded and flushed in one write; its events and tokens are
    recorded on `client` once the sink has accepted them. Returns the tokens
    written when `batches` ends. Raises ClientDisconnected (carrying the tokens
    written so far) the moment the client goes away, and stops reading
    `batches`; NoFlushError for a sink without flush(). With `heartbeat`
    seconds, an idle stream gets a `: ping` comment that often. Once `stop` is done
    (a shutdown), the stream stops at once and Interrupted is raised, carrying the tokens
    written.
    """
    frames = encode_chunks(batches, count=count, ids=ids, first_id=first_id)
    return await relay_frames(sink, frames, client=client, heartbeat=heartbeat, stop=stop)


async def relay_frames(
    sink: EventSink,
    frames: AsyncIterable[Frames],
    *,
    client: ClientMeter,
    heartbeat: float | None = None,
    headers: Sequence[tuple[bytes, bytes]] = SSE_HEADERS,
    stop: asyncio.Future[None] | None = None,
    gate: BudgetGate | None = None,
    lazy_start: bool = False,
    express: Callable[[ExpressLane], None] | None = None,
) -> int:
    """Write each Frames to `sink` and flush it at once: stream_sse() for
    events that are already encoded (a relayed upstream, a broadcast).
    Same contract as stream_sse(). With `gate` (a key's budget), a Frames that
    would pass the budget is not written: the gate's error event ends the
    stream and BudgetExhausted is raised. With `lazy_start` the headers go out
    with the first write (a whole answer, which a budget may refuse before it
    starts: BudgetExhausted then says `started=False`). `express` is given an
    ExpressLane once the stream has started, if the sink has one to offer (an
    ExpressSink, no gate, no lazy start)."""
    if not callable(getattr(sink, "flush", None)):
        raise NoFlushError()
    if not lazy_start:
        await sink.start(headers)
    activity = _Activity(asyncio.get_running_loop().time())
    pump = asyncio.create_task(
        _pump(sink, aiter(frames), client, activity, gate, None if not lazy_start else headers)
    )
    watcher = asyncio.create_task(sink.wait_disconnected())
    tasks = {pump, watcher}
    lane = None
    if express is not None and gate is None and not lazy_start and hasattr(sink, "write_now"):
        lane = ExpressLane(cast(ExpressSink, sink), client, activity)
        express(lane)
    keep_alive = None
    if heartbeat:
        keep_alive = asyncio.create_task(_keep_alive(sink, heartbeat, activity))
        tasks.add(keep_alive)  # it ends only when a ping finds the client gone, or fails
    try:
        # `stop` is shared by every stream of a run: waited on, never cancelled here.
        await asyncio.wait(
            tasks if stop is None else {*tasks, stop}, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # Whatever ended the race (the source, the client, or a cancel from
        # outside), the other side stops now: a gone client stops the reads,
        # and the source is closed even if the pump stopped between reads.
        if lane is not None:
            lane.open = False  # before the cancels land: nothing more is written
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        await _aclose(frames)
    if keep_alive is not None and not keep_alive.cancelled():
        if (error := keep_alive.exception()) is not None:
            raise error  # a failed ping is not a gone client: say what went wrong
    if isinstance(error := None if pump.cancelled() else pump.exception(), _Exhausted):
        raise BudgetExhausted(client.billed_tokens, started=error.started)
    if lazy_start and not getattr(sink, "started", True):
        await sink.start(headers)  # a whole answer with nothing in it: its headers now
    if pump.cancelled() or isinstance(pump.exception(), _Gone):
        # The watcher ran to its end only if the client went away (else it was cancelled).
        if stop is not None and stop.done() and watcher.cancelled():
            raise Interrupted(client.billed_tokens)
        raise ClientDisconnected(client.billed_tokens)
    pump.result()  # re-raises a source error
    return client.billed_tokens


class _Activity:
    """What pump and keep-alive share: when the stream last wrote (event loop
    time), and what makes each write-and-flush whole, so a ping and an event are
    never sent at once: a ping's flush holds `lock`; the pump's sets `flushing`,
    and takes the lock only while a ping holds it."""

    __slots__ = ("flushing", "last", "lock")

    def __init__(self, last: float) -> None:
        self.last = last
        self.lock = asyncio.Lock()
        self.flushing = False


async def _pump(
    sink: EventSink,
    frames: AsyncIterator[Frames],
    client: ClientMeter,
    activity: _Activity,
    gate: BudgetGate | None = None,
    headers: Sequence[tuple[bytes, bytes]] | None = None,
) -> None:
    # The per-event path: the next Frames, write and flush it, bill it.
    time = asyncio.get_running_loop().time
    async for item in frames:
        last = False
        if gate is not None and not gate.take(item) and not await gate.admit(item):
            part = await gate.part_that_fits(item)
            if part is None:
                await _cut(sink, client, activity, gate, headers)
            item, last = part, True  # the events that fit, then the cut
        if headers is not None:  # lazy start: the headers go with the first write
            await sink.start(headers)
            headers = None
        # No bytes: tokens of bytes already delivered (counted at the end), billed as they are.
        if item.payload:
            # The lock only when a ping holds it (a flush stuck on a slow client): an
            # uncontended `async with` on every event cost 0.6 us of ~20 (issue 17).
            if activity.lock.locked():
                async with activity.lock:
                    pass  # the ping is out; nothing can come in between from here
            activity.flushing = True
            sink.write(item.payload)
            try:
                delivered = await sink.flush()
            except asyncio.CancelledError:
                # Cancelled once the connection had the bytes: they are the client's.
                if getattr(sink, "accepted", False):
                    client.record(item.events, item.tokens, len(item.payload), item.pending)
                raise
            finally:
                activity.flushing = False
            if not delivered:
                raise _Gone
            activity.last = time()
        client.record(item.events, item.tokens, len(item.payload), item.pending)
        if last:
            assert gate is not None
            await _cut(sink, client, activity, gate, None)


async def _cut(
    sink: EventSink,
    client: ClientMeter,
    activity: _Activity,
    gate: BudgetGate,
    headers: Sequence[tuple[bytes, bytes]] | None,
) -> NoReturn:
    """End a stream whose next write would pass its key's budget: its API's error event
    (unless nothing was sent yet: then it can still get an error status), billed as the one
    event it is, with no tokens."""
    if headers is not None:
        raise _Exhausted(started=False)
    async with activity.lock:
        sink.write(gate.error_event)
        if await sink.flush():
            client.record(1, 0, len(gate.error_event), client.tail)
    raise _Exhausted(started=True)


async def _keep_alive(sink: EventSink, interval: float, activity: _Activity) -> None:
    """Ping a stream once it has been idle for `interval`. One timer per client
    rather than a timeout around every read: with 1,000 clients that is the
    difference between a task per event per client and none."""
    loop = asyncio.get_running_loop()
    while True:
        # A flush stuck on a slow client is not idleness: wait a whole interval more.
        idle = 0.0 if activity.flushing else loop.time() - activity.last
        if idle < interval:
            await asyncio.sleep(interval - idle)
            continue
        async with activity.lock:
            sink.write(PING)
            if not await sink.flush():
                return
        activity.last = loop.time()
