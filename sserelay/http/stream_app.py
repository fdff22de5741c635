"""The `serve` endpoint: one hub, broadcast to every client that connects, and `/ui`.

The stream endpoint bypasses starlette's Response classes on purpose: the per-event path is
one ASGI `send` per ready batch, nothing more.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sserelay.errors import BudgetExhausted, ClientDisconnected, Interrupted, SourceError
from sserelay.http.access import Access, Keys, Refusal
from sserelay.http.asgi import ASGISink, abort_of, header, healthz, query_value, send_response
from sserelay.http.endpoint import SHUTDOWN_GRACE, Endpoint, Outcome, request_id_header
from sserelay.metering.bill import ClientBill
from sserelay.metering.keys import Key
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.reason import Reason
from sserelay.streaming.hub import Hub
from sserelay.streaming.stream import SSE_HEADERS, relay_frames

#: Sent before a client's first event: an EventSource that loses the connection comes back
#: (with Last-Event-ID) after this many milliseconds instead of its default (about 3 s).
RETRY_MS = 1000
RETRY = f"retry: {RETRY_MS}\n".encode()

#: Whose stream a session serves: its own source's ("source"), its source's as published
#: to a topic for other instances too ("publisher"), or a topic's ("follower").
Role = Literal["source", "publisher", "follower"]


class StreamSession(Endpoint):
    """One run of `serve`: one hub, served to every client that connects.

    The run ends (`finished` is set, with `reason`) when the stream has ended
    and every client has finished, or when the last client leaves before the
    end and none comes back (resuming) within `linger` seconds (the stream was
    abandoned: the source is no longer read, and the run's reason is that
    client's). With `keep` it ends only on interrupt() (Ctrl-C
    or SIGTERM); a source that fails ends it in both modes once the clients
    have what was read before the failure.

    A `publisher`'s source is read to its end whoever listens (other instances' clients
    do), so no client abandons it: the run ends once the end is published and its own
    clients have finished (or on interrupt, with `keep`). A `follower` serves a topic
    until interrupted, whatever happens to the topic's source."""

    def __init__(
        self,
        hub: Hub,
        meter: Meter,
        *,
        heartbeat: float | None,
        keep: bool = False,
        access: Access | None = None,
        keys: Keys | None = None,
        linger: float = 0.0,
        role: Role = "source",
    ) -> None:
        super().__init__(meter, access=access, keys=keys)
        self.hub = hub
        self.heartbeat = heartbeat
        self.keep = keep or role == "follower"
        self.role = role
        self.linger = linger
        self._lingering: asyncio.TimerHandle | None = None
        self._headers = [*SSE_HEADERS, *self.access.cors_headers]
        if role == "publisher":
            hub.on_end = self._stream_over

    def _interrupted(self) -> None:
        self.hub.stop()

    def _finish(self, reason: Reason, error: str | None = None) -> None:
        self.meter.invalid_utf8_bytes = self.hub.invalid_utf8_bytes
        super()._finish(reason, error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":  # a CORS preflight (fetch() with a header)
            headers = self.access.preflight_headers("GET")
            await send_response(send, 204, b"", b"text/plain", headers)
            return
        key, refusal = self._refusal(scope)
        if refusal is None and key is not None:
            refusal = self.admit(key, None)
        if refusal is not None:
            if refusal.status == 204:
                await send_response(send, 204, b"", b"text/plain", self.access.cors_headers)
            else:
                await self.refuse(scope, send, refusal, None, key=key)
            return
        if self._lingering is not None:  # a client back within the linger: the stream goes on
            self._lingering.cancel()
            self._lingering = None
        last_event_id = header(scope, b"last-event-id") or query_value(scope, "last_event_id")
        if self.hub.has_everything(last_event_id):
            # WHATWG HTML §9.2.3: a 204 tells an EventSource not to reconnect.
            await send_response(send, 204, b"", b"text/plain", self.access.cors_headers)
            return
        if scope["method"] == "HEAD":  # the headers a GET would get; no stream, no client
            await send_response(send, 200, b"", b"text/event-stream", self._headers[1:])
            return
        await self.serve_client(
            scope,
            lambda client: self._serve(scope, receive, send, client, last_event_id),
            unforeseen=(Reason.INPUT_ERROR, "the stream failed unexpectedly"),
            key=key,
        )

    def _refusal(self, scope: Scope) -> tuple[Key | None, Refusal | None]:
        if self.finished.is_set() and not self.stopping:
            # WHATWG HTML §9.2.3: a 204 tells an EventSource not to reconnect.
            return None, Refusal(204, None, "the stream is over")
        return self.identify(scope)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        client: ClientMeter,
        last_event_id: str | None,
    ) -> Outcome:
        abort = abort_of(scope)
        # A slow client's writes are stuck behind a full socket: closing the connection
        # hard (RST) ends them and frees the buffers at once. Without that extension (a
        # foreign server), a cut client ends at its next read.
        # `retry:` only where a reconnect can resume: with ids (a replay --no-ids is
        # byte for byte the recording).
        greeting = RETRY if self.hub.log.ids else b""
        listener = self.hub.join(last_event_id, on_cut=abort or (lambda: None), greeting=greeting)
        sink = ASGISink(receive, send, scope)
        # One frame for the whole stream (no helper coroutine): each stays suspended for as
        # long as the stream is open.
        try:
            await relay_frames(
                sink,
                listener,
                client=client,
                heartbeat=self.heartbeat,
                headers=[*self._headers, request_id_header(client)],
                stop=self.stop,
                gate=self.gate(client, None),
            )
        except ClientDisconnected:
            return (Reason.SLOW_CLIENT if listener.cut else Reason.CLIENT_DISCONNECTED), None
        except SourceError as exc:
            await sink.end()
            return Reason.INPUT_ERROR, str(exc)
        except Interrupted:
            await _end_now(sink, abort)
            return Reason.INTERRUPTED, None
        except BudgetExhausted:
            await sink.end()
            return Reason.BUDGET_EXHAUSTED, None
        else:
            if listener.cut:
                return Reason.SLOW_CLIENT, None
            await sink.end()
            return Reason.COMPLETE, None
        finally:
            await listener.aclose()

    def _ended(self, bill: ClientBill) -> None:
        """A client is done: does the run end with it?"""
        if self.open:
            return
        if self.stopping:
            self._finish(Reason.INTERRUPTED)
        elif self.role == "follower":
            return
        elif self.hub.error is not None:
            self._finish(Reason.INPUT_ERROR, self.hub.error)
        elif self.keep:
            return
        elif self.hub.ended:
            self._finish(Reason.COMPLETE)
        elif self.role != "source":
            return  # a publisher's source is read to its end whoever listens; see the class
        elif self.linger > 0:  # left before the end: a resume may come (a network blip)
            loop = asyncio.get_running_loop()
            self._lingering = loop.call_later(self.linger, self._abandon, bill)
        else:
            self._abandon(bill)

    def _abandon(self, bill: ClientBill) -> None:
        """Nobody came back: stop reading the source; the run's reason is the last client's."""
        self._lingering = None
        if self.open:
            return
        self.hub.stop()
        self._finish(bill.reason, bill.error)

    def _stream_over(self) -> None:
        """A publisher's stream has ended (its end read back from the topic): the run ends
        now if none of its clients is still taking it."""
        if not self.open and not self.stopping and not self.keep:
            if self.hub.error is not None:
                self._finish(Reason.INPUT_ERROR, self.hub.error)
            else:
                self._finish(Reason.COMPLETE)


async def _end_now(sink: ASGISink, abort: Callable[[], None] | None) -> None:
    """End an interrupted stream; a client that does not read must not hold up the exit:
    after SHUTDOWN_GRACE its connection is reset."""
    try:
        async with asyncio.timeout(SHUTDOWN_GRACE):
            await sink.end()
    except TimeoutError:
        if abort is not None:
            abort()


def ui_page(**settings: str) -> str:
    """The `/ui` page (sserelay/http/ui.html), its `{{name}}` settings filled in, HTML-escaped."""
    page = resources.files("sserelay.http").joinpath("ui.html").read_text(encoding="utf-8")
    for name, value in settings.items():
        page = page.replace("{{" + name + "}}", html.escape(value))
    return page


#: The page loads nothing from anywhere: its script and style are inline, and
#: it may connect only to this server (its EventSource).
UI_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'"
    ),
}


#: The paths and methods of the stream, which go straight to it (see create_app).
STREAM_PATHS = frozenset({"/", "/events"})
STREAM_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def create_app(
    stream: Callable[[Scope, Receive, Send], Awaitable[None]], ui: str | None = None
) -> ASGIApp:
    """The app: the event stream at `/` and `/events`, `ok` at `/healthz`,
    and the page `ui` (HTML) at `/ui` if given.

    A stream request goes straight to `stream`, the rest to a Starlette router: its
    middleware and routing frames would stay suspended for as long as each stream is
    open (3 KiB per idle client). `stream` answers its own errors and refusals."""

    async def ui_endpoint(request: Request) -> Response:
        return HTMLResponse(ui or "", headers=UI_HEADERS)

    routes = [
        Route("/", stream, methods=["GET", "OPTIONS"]),
        Route("/events", stream, methods=["GET", "OPTIONS"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if ui is not None:
        routes.append(Route("/ui", ui_endpoint, methods=["GET"]))
    shown = ", ".join(route.path for route in routes)

    async def not_found(request: Request) -> Response:
        # A typo'd path (`/event`) says where things are, not only "Not Found".
        return PlainTextResponse(f"sserelay: no such path; try {shown}\n", status_code=404)

    routes.append(Route("/{path:path}", not_found))
    router = Starlette(routes=routes)

    # Not a coroutine: it hands over the awaitable, adding no frame of its own.
    def app(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if (
            scope["type"] == "http"
            and scope["path"] in STREAM_PATHS
            and scope["method"] in STREAM_METHODS
        ):
            return stream(scope, receive, send)
        return router(scope, receive, send)

    return app
