"""The ASGI pieces every endpoint (the stream, the mock, the proxy) shares.

`ASGISink` is the EventSink over one response; the functions read a request (its body,
its peer, its headers), watch for its disconnect, race an await against the end of the
request or of the run, and answer small responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

#: The ASGI extension our server adds (http/server.py): `open()`, whether the connection
#: still takes what is sent, answered synchronously, right after a send; `write(body)`, a
#: piece of the body written straight to the transport (True: taken, False: the connection
#: is gone, None: not now, use `send`); `ready()`, whether `write(body)` would take it now.
CONNECTION_EXTENSION = "sserelay.connection"
#: The ASGI extension whose `abort()` closes the connection at once with a reset.
ABORT_EXTENSION = "sserelay.abort"


class ASGISink:
    """An EventSink over one ASGI response, sent with `status` (200 unless set before start()).

    `gone` is set once the client has disconnected, and stays set. The sink learns of it by
    reading `receive` in wait_disconnected(), which relay_frames() runs for as long as the
    stream; on our own server it also asks the connection right after each send, which makes
    a flush exact with no extra turn of the event loop. There a flush also skips ASGI `send`
    and writes to the transport itself while the transport is not paused (the response's
    start and end, and every write while it is paused, still go through `send`)."""

    def __init__(self, receive: Receive, send: Send, scope: Scope | None = None) -> None:
        self._receive = receive
        self._send = send
        self._buffer: list[bytes] = []
        self._connected = _extension(scope, CONNECTION_EXTENSION, "open")
        self._write_now = _extension(scope, CONNECTION_EXTENSION, "write")
        self._ready_now = _extension(scope, CONNECTION_EXTENSION, "ready")
        self.status = 200
        self.started = False
        self.accepted = False
        self.gone = asyncio.Event()

    async def start(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        await self._send(
            {"type": "http.response.start", "status": self.status, "headers": list(headers)}
        )
        self.started = True

    def write(self, data: bytes) -> None:
        self._buffer.append(data)

    async def flush(self) -> bool:
        body = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        self.accepted = False
        if self._write_now is not None:
            # Straight to the transport, synchronously: the transport took the bytes or
            # the connection was gone, and no cancel can land in between.
            taken = self._write_now(body)
            if taken is not None:
                self.accepted = bool(taken)
                return self.accepted
        # uvicorn may wait for the socket to drain before it writes; nothing is written if
        # a cancel lands there.
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        if self._connected is not None:
            # uvicorn drops a write to a closed connection without a word, and writes at
            # once otherwise: asked now, the connection says which it was.
            self.accepted = bool(self._connected())
            return self.accepted
        # Elsewhere: if the connection was lost before this write, the watcher's wake-up is
        # already queued; one yield lets it run, so a lost write is never billed. A cancel
        # during that yield lands after the bytes were handed over: they are billed.
        self.accepted = True
        await asyncio.sleep(0)
        self.accepted = not self.gone.is_set()
        return self.accepted

    def ready(self) -> bool:
        """Whether write_now() would hand bytes to the connection now (see ExpressSink)."""
        return self._write_now is not None and self._ready_now is not None and self._ready_now()

    def write_now(self, data: bytes) -> bool:
        """Hand `data` to the connection now, with no flush to await; True once it took
        them. Only right after ready() said True, with no await in between."""
        assert self._write_now is not None
        return self._write_now(data) is True

    async def wait_disconnected(self) -> None:
        await watch_disconnect(self._receive, self.gone)

    async def end(self) -> None:
        """Finish the response cleanly (the terminating chunk), if the client is still there."""
        if self.started and not self.gone.is_set():
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _extension(scope: Scope | None, name: str, key: str) -> Callable[..., Any] | None:
    found = (scope or {}).get("extensions", {}).get(name, {}).get(key)
    return found if callable(found) else None


def abort_of(scope: Scope) -> Callable[[], None] | None:
    """The connection's hard close, where the server offers it (see server.py)."""
    return _extension(scope, ABORT_EXTENSION, "abort")


async def watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """Read `receive` until the client disconnects, then set `gone`."""
    # The first receive() of a GET is its (empty) body; only later ones
    # report the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The whole request body; None if the client left before sending it. A body over
    `limit` bytes raises BodyTooLarge as soon as it is over (the rest is not read)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if limit is not None and size > limit:
            raise BodyTooLarge(limit)
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


class BodyTooLarge(Exception):
    """A request body over the limit (answered 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over {limit:,} bytes")
        self.limit = limit


async def unless(awaitable: Awaitable[T], *ends: asyncio.Event | asyncio.Future[Any]) -> T | None:
    """The result of `awaitable`, or None (and `awaitable` cancelled) if one of `ends` (the
    client gone, the run stopping) comes first. An error `awaitable` raised while an end
    came is no longer anybody's: None too."""
    task = asyncio.ensure_future(awaitable)
    waiters = [
        asyncio.ensure_future(end.wait()) if isinstance(end, asyncio.Event) else end for end in ends
    ]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for end, waiter in zip(ends, waiters, strict=True):
            if waiter is not end:  # a shared future is not ours to cancel
                waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not task.done() or task.cancelled():
        return None
    if any(_is_set(end) for end in ends) and task.exception() is not None:
        return None
    return task.result()


def _is_set(end: asyncio.Event | asyncio.Future[Any]) -> bool:
    return end.is_set() if isinstance(end, asyncio.Event) else end.done()


def peer(scope: Scope) -> str:
    """The client's `host:port`, or "" if the server does not say."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def header_values(scope: Scope, name: bytes) -> list[str]:
    """Every value of the request header `name` (lower case), in order."""
    return [bytes(value).decode("latin-1") for key, value in scope["headers"] if key == name]


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the request header `name` (lower case), if it was sent."""
    values = header_values(scope, name)
    return values[0] if values else None


def query_values(scope: Scope, name: str) -> list[str]:
    """Every value of the query parameter `name`, in order."""
    return parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name, [])


def query_value(scope: Scope, name: str) -> str | None:
    """The last value of the query parameter `name`, if it was sent."""
    values = query_values(scope, name)
    return values[-1] if values else None


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """A whole small response, from inside a raw ASGI endpoint."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: Send, status: int, body: object, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send_response(send, status, data, b"application/json", headers)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")
