"""The HTTP face: a starlette app whose stream routes are raw ASGI endpoints.

The stream endpoint bypasses starlette's Response classes on purpose: the
per-event path is one ASGI `send` per ready batch, nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import ClientDisconnected, SourceError
from .meter import ClientMeter, Meter
from .sources import LineSource
from .stream import stream_sse


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


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


class StreamSession:
    """One run of `serve`: one source, served to the first client that connects.

    `finished` is set with the run's reason when the stream ends, the client
    leaves, the source fails, or the run is interrupted."""

    def __init__(
        self,
        source: LineSource,
        meter: Meter,
        *,
        count: Callable[[str], int],
        ids: bool,
        heartbeat: float | None,
    ) -> None:
        self.source = source
        self.meter = meter
        self.count = count
        self.ids = ids
        self.heartbeat = heartbeat
        self.reason: str | None = None
        self.error: str | None = None
        self.finished = asyncio.Event()
        self._stream_task: asyncio.Task[Any] | None = None
        self._interrupting = False

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: end the open stream cleanly and finish the run."""
        self._interrupting = True
        if self._stream_task is not None:
            self._stream_task.cancel()
        else:
            self._finish("interrupted")

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.error = error
        self.finished.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._stream_task is not None or self.finished.is_set():
            response = PlainTextResponse(
                "sserelay: this stream is already being served to another client\n",
                status_code=409,
            )
            await response(scope, receive, send)
            return
        self._stream_task = asyncio.current_task()
        client = self.meter.open_client(_peer(scope))
        sink = ASGISink(receive, send)
        reason, error = await self._serve(sink, client)
        client.close(reason)
        self.meter.invalid_utf8_bytes = self.source.invalid_utf8_bytes
        self._finish(reason, error)

    async def _serve(self, sink: ASGISink, client: ClientMeter) -> tuple[str, str | None]:
        try:
            await stream_sse(
                sink,
                self.source.batches(),
                client=client,
                count=self.count,
                ids=self.ids,
                heartbeat=self.heartbeat,
            )
        except ClientDisconnected:
            return "client_disconnected", None
        except SourceError as exc:
            await sink.end()
            return "input_error", str(exc)
        except asyncio.CancelledError:
            if not self._interrupting:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            await sink.end()
            return "interrupted", None
        await sink.end()
        return "complete", None


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def create_app(stream: Callable[[Scope, Receive, Send], Any]) -> Starlette:
    """The app: the event stream at `/` and `/events`, `ok` at `/healthz`."""
    return Starlette(
        routes=[
            Route("/", stream, methods=["GET"]),
            Route("/events", stream, methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET"]),
        ]
    )
