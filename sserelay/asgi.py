"""The ASGI side every endpoint (the stream, the mock, the proxy) shares.

`ASGISink` is the EventSink over one response; the functions read a request
(its body, its peer), watch for its disconnect, and answer `/healthz`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send


class ASGISink:
    """An EventSink over one ASGI response."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._buffer: list[bytes] = []
        self.started = False
        self.disconnected = False

    async def start(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        self.started = True

    def write(self, data: bytes) -> None:
        self._buffer.append(data)

    async def flush(self) -> bool:
        body = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        # uvicorn drops a write to a closed connection without a word. If the
        # connection was lost before this write, the watcher's wake-up is
        # already queued: one yield lets it run, so a lost write is never billed.
        await asyncio.sleep(0)
        return not self.disconnected

    async def wait_disconnected(self) -> None:
        # The first receive() of a GET is its (empty) body; only later ones
        # report the disconnect.
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True

    async def end(self) -> None:
        """Finish the response cleanly (the terminating chunk), if the client is still there."""
        if self.started and not self.disconnected:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client left before sending it."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def peer(scope: Scope) -> str:
    """The client's `host:port`, or "" if the server does not say."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def uncancel() -> None:
    """In an `except CancelledError` for a cancel the endpoint sent itself (an
    interrupt, a cut-off): take it back, so the request ends cleanly and is billed."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")
