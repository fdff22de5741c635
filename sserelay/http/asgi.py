"""The ASGI side every endpoint (the stream, the mock, the proxy) shares.

`ASGISink` is the EventSink over one response; the functions read a request
(its body, its peer), watch for its disconnect, and answer `/healthz`.
`RequestEndpoint` is the life cycle of the mock and the proxy, which bill
each request on its own row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from sserelay.metering.meter import ClientMeter, Meter

#: Called with each request's meter, closed, and its error message (None if it had none).
OnFinished = Callable[[ClientMeter, "str | None"], None]
#: How a request ended: its reason (a bill reason) and its error message, if any.
Outcome = tuple[str, "str | None"]


class ASGISink:
    """An EventSink over one ASGI response, sent with `status` (200 unless set
    before start()).

    `gone` is set once the client has disconnected, and stays set. The sink
    learns of it by reading `receive` in wait_disconnected(), which
    relay_frames() runs for as long as the stream."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._buffer: list[bytes] = []
        self.status = 200
        self.started = False
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
        await self._send({"type": "http.response.body", "body": body, "more_body": True})
        # uvicorn drops a write to a closed connection without a word. If the
        # connection was lost before this write, the watcher's wake-up is
        # already queued: one yield lets it run, so a lost write is never billed.
        await asyncio.sleep(0)
        return not self.gone.is_set()

    async def wait_disconnected(self) -> None:
        await watch_disconnect(self._receive, self.gone)

    async def end(self) -> None:
        """Finish the response cleanly (the terminating chunk), if the client is still there."""
        if self.started and not self.gone.is_set():
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """Read `receive` until the client disconnects, then set `gone`."""
    # The first receive() of a GET is its (empty) body; only later ones
    # report the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


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


class RequestEndpoint:
    """An endpoint that bills each request on its own row (`serve --as`, `proxy`).

    `finished` is set when the run is over: on interrupt(), or with `once`
    after the first billed request ends (its reason and error are then the
    run's). `on_finished` sees each request as it ends."""

    def __init__(self, meter: Meter, *, once: bool, on_finished: OnFinished) -> None:
        self.meter = meter
        self.once = once
        self.on_finished = on_finished
        self.finished = asyncio.Event()
        self.reason: str | None = None
        self.error: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._claimed = False
        self._interrupting = False

    @property
    def closed(self) -> bool:
        """Whether a new request is refused: shutting down, or (`once`) the one request taken."""
        return (self.once and self._claimed) or self._interrupting

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: cut every open request and finish."""
        self._interrupting = True
        for task in self._tasks:
            task.cancel()
        self._finish("interrupted")

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.error = error
        self.finished.set()

    async def _bill_request(
        self,
        scope: Scope,
        handle: Callable[[ClientMeter], Awaitable[Outcome]],
        *,
        unforeseen: Outcome,
    ) -> None:
        """Run `handle` for this request as a row of the bill, cut by interrupt().
        `unforeseen` is the outcome if something escapes `handle`: the request is
        still billed and `once` still ends, rather than waiting for a request that is gone."""
        self._claimed = True
        client = self.meter.open_client(peer(scope))
        client.method = scope["method"]
        client.path = scope["path"]  # never the query: keys travel there
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        outcome = unforeseen
        try:
            outcome = await handle(client)
        finally:
            self._tasks.discard(task)
            reason, error = outcome
            client.close(reason)
            error = self._ended(error)
            self.on_finished(client, error)
            if self.once:
                self._finish(reason, error)

    def _ended(self, error: str | None) -> str | None:
        """A request has ended (and is closed on the meter) with `error`: the
        error as its receipt and the run show it."""
        return error
