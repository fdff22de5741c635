"""stream_sse(): write chunks to one client as SSE events, flushed at once, metered as they go.

The sink is the client's connection, seen through four calls: `start()` sends
the headers, `write()` buffers bytes, `flush()` hands what was written to the
connection and says whether the client was still there, `wait_disconnected()`
returns when the client goes away. A batch of chunks that were ready together
goes out in one flush; no chunk ever waits for a later one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Protocol

from .errors import ClientDisconnected, NoFlushError
from .meter import ClientMeter
from .sse import encode_data
from .tokens import count_tokens

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
        """Send what was written. False if the client had gone away (nothing was delivered)."""
        ...

    async def wait_disconnected(self) -> None: ...


class _Gone(Exception):
    """The sink reported the client gone during a flush."""


_END = object()


async def _next_batch(batches: AsyncIterator[Sequence[str]]) -> Sequence[str] | object:
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return _END


async def stream_sse(
    sink: EventSink,
    batches: AsyncIterable[Sequence[str]],
    *,
    client: ClientMeter,
    count: Callable[[str], int] = count_tokens,
    ids: bool = True,
    first_id: int = 1,
    heartbeat: float | None = None,
) -> int:
    """Stream every chunk of `batches` to `sink` as one SSE event each.

    Each batch is encoded and flushed in one write; its events and tokens are
    recorded on `client` once the sink has accepted them. Returns the tokens
    written when `batches` ends. Raises ClientDisconnected (carrying the tokens
    written so far) the moment the client goes away, and stops reading
    `batches`; NoFlushError for a sink without flush(). With `heartbeat`
    seconds, an idle stream gets a `: ping` comment that often.
    """
    if not callable(getattr(sink, "flush", None)):
        raise NoFlushError()
    await sink.start(SSE_HEADERS)
    pump = asyncio.create_task(
        _pump(sink, aiter(batches), client, count, first_id if ids else None, heartbeat)
    )
    watcher = asyncio.create_task(sink.wait_disconnected())
    try:
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Whatever ended the race (the source, the client, or a cancel from
        # outside), the other side stops now: a gone client stops the reads.
        for task in (pump, watcher):
            if not task.done():
                task.cancel()
        for task in (pump, watcher):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if pump.cancelled() or isinstance(pump.exception(), _Gone):
        raise ClientDisconnected(client.tokens)
    pump.result()  # re-raises a source error
    return client.tokens


async def _pump(
    sink: EventSink,
    batches: AsyncIterator[Sequence[str]],
    client: ClientMeter,
    count: Callable[[str], int],
    next_id: int | None,
    heartbeat: float | None,
) -> None:
    pending: asyncio.Task[Sequence[str] | object] | None = None
    try:
        while True:
            if heartbeat:
                if pending is None:
                    pending = asyncio.create_task(_next_batch(batches))
                done, _ = await asyncio.wait({pending}, timeout=heartbeat)
                if not done:
                    sink.write(PING)
                    if not await sink.flush():
                        raise _Gone
                    continue
                batch = pending.result()
                pending = None
            else:
                batch = await _next_batch(batches)
            if batch is _END:
                return
            assert isinstance(batch, Sequence)
            if not batch:
                continue
            tokens = 0
            frames: list[bytes] = []
            for chunk in batch:
                tokens += count(chunk)
                if next_id is None:
                    frames.append(encode_data(chunk))
                else:
                    frames.append(encode_data(chunk, str(next_id)))
                    next_id += 1
            payload = frames[0] if len(frames) == 1 else b"".join(frames)
            sink.write(payload)
            if not await sink.flush():
                raise _Gone
            client.record(len(frames), tokens, len(payload))
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
