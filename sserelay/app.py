"""The HTTP face: a starlette app whose stream routes are raw ASGI endpoints.

The stream endpoint bypasses starlette's Response classes on purpose: the
per-event path is one ASGI `send` per ready batch, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .asgi import ASGISink, healthz, peer, uncancel
from .errors import ClientDisconnected, SourceError
from .hub import Hub, Listener
from .meter import ClientMeter, Meter
from .stream import SSE_HEADERS, relay_frames

#: How long an interrupted stream waits for a client to take its terminating chunk.
END_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class Access:
    """Who may open the stream. `token`: clients must send `Authorization:
    Bearer TOKEN` or `?token=TOKEN` (else 401); `max_clients`: more at once get
    503; `cors_origin`: the `Access-Control-Allow-Origin` of stream responses."""

    token: str | None = None
    max_clients: int | None = None
    cors_origin: str | None = None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _query(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[-1] if values else None


def _credentials_given_twice(scope: Scope) -> bool:
    """Whether the request has two Authorization headers, or two `token` parameters.

    RFC 9110 §11.6.2: Authorization holds one credential, not a list (§5.3), so two
    make the request malformed."""
    authorizations = sum(1 for key, _ in scope["headers"] if key == b"authorization")
    tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
    return authorizations > 1 or len(tokens) > 1


def _abort(scope: Scope) -> Callable[[], None] | None:
    """The connection's hard close, where the server offers it (see server.py)."""
    abort = scope.get("extensions", {}).get("sserelay.abort", {}).get("abort")
    return abort if callable(abort) else None


class StreamSession:
    """One run of `serve`: one hub, served to every client that connects.

    The run ends (`finished` is set, with `reason`) when the stream has ended
    and every client has finished, or when the last client leaves before the
    end (the stream was abandoned: the source is no longer read, and the run's
    reason is that client's). With `keep` it ends only on interrupt() (Ctrl-C
    or SIGTERM); a source that fails ends it in both modes once the clients
    have what was read before the failure."""

    def __init__(
        self,
        hub: Hub,
        meter: Meter,
        *,
        heartbeat: float | None,
        keep: bool = False,
        access: Access | None = None,
    ) -> None:
        self.hub = hub
        self.meter = meter
        self.heartbeat = heartbeat
        self.keep = keep
        self.access = access = access or Access()
        self.reason: str | None = None
        self.error: str | None = None
        self.finished = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._interrupting = False
        self._cors: list[tuple[bytes, bytes]] = (
            [(b"access-control-allow-origin", access.cors_origin.encode("latin-1"))]
            if access.cors_origin
            else []
        )
        self._headers = [*SSE_HEADERS, *self._cors]

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM: end every open stream cleanly and finish the run."""
        self._interrupting = True
        self.hub.stop()
        for task in self._tasks:
            task.cancel()
        if not self._tasks:
            self._finish("interrupted")

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self.reason is None:
            self.reason = reason
            self.error = error
        self.meter.invalid_utf8_bytes = self.hub.source.invalid_utf8_bytes
        self.finished.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = self.meter.open_client(peer(scope))
        cut = self._cut_off(task, _abort(scope))
        last_event_id = _header(scope, b"last-event-id") or _query(scope, "last_event_id")
        listener = self.hub.join(last_event_id, on_cut=cut)
        try:
            reason, error = await self._serve(ASGISink(receive, send), client, listener)
        finally:
            await listener.aclose()
            self._tasks.discard(task)
        client.close(reason)
        self._left(reason, error)

    def _refusal(self, scope: Scope) -> Response | None:
        """The answer for a client that does not get the stream, if it does not."""
        if scope["method"] == "OPTIONS":  # a CORS preflight (fetch() with a header)
            return Response(status_code=204, headers=self._preflight_headers())
        cors = {k.decode(): v.decode("latin-1") for k, v in self._cors}
        if self.access.token is not None and _credentials_given_twice(scope):
            # Not a 401: the client did send credentials. But which counts is ambiguous
            # (a proxy in front may check the first, another server the last).
            return PlainTextResponse(
                "sserelay: bad request: more than one Authorization header or ?token=\n",
                status_code=400,
                headers=cors,
            )
        if not self._authorized(scope):
            return PlainTextResponse(
                "sserelay: unauthorized: send Authorization: Bearer TOKEN or ?token=TOKEN\n",
                status_code=401,
                headers={**cors, "WWW-Authenticate": "Bearer"},
            )
        if scope["method"] == "HEAD":  # the headers a GET would get; no stream, no client
            headers = {k.decode(): v.decode() for k, v in SSE_HEADERS}
            return Response(status_code=200, headers={**headers, **cors})
        if self.finished.is_set():
            return PlainTextResponse(
                "sserelay: the stream is over\n", status_code=503, headers=cors
            )
        limit = self.access.max_clients
        if limit is not None and len(self._tasks) >= limit:
            return PlainTextResponse(
                f"sserelay: too many clients (at most {limit})\n", status_code=503, headers=cors
            )
        last_event_id = _header(scope, b"last-event-id") or _query(scope, "last_event_id")
        if self.hub.has_everything(last_event_id):
            # WHATWG HTML §9.2.3: a 204 tells an EventSource not to reconnect.
            return Response(status_code=204, headers=cors)
        return None

    def _preflight_headers(self) -> dict[str, str]:
        if not self.access.cors_origin:
            return {"Allow": "GET, OPTIONS"}
        return {
            "Access-Control-Allow-Origin": self.access.cors_origin,
            "Access-Control-Allow-Methods": "GET",
            "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control",
            "Access-Control-Max-Age": "600",
        }

    def _authorized(self, scope: Scope) -> bool:
        token = self.access.token
        if token is None:
            return True
        given = _query(scope, "token")
        header = _header(scope, b"authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip()
        # Compared in constant time: the token is a secret.
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def _cut_off(
        self, task: asyncio.Task[Any], abort: Callable[[], None] | None
    ) -> Callable[[], None]:
        # A slow client's writes are stuck behind a full socket: closing the
        # connection hard (RST) ends them and frees the buffers at once.
        if abort is not None:
            return abort

        def cancel() -> None:
            task.cancel()

        return cancel

    async def _serve(
        self, sink: ASGISink, client: ClientMeter, listener: Listener
    ) -> tuple[str, str | None]:
        try:
            await relay_frames(
                sink, listener, client=client, heartbeat=self.heartbeat, headers=self._headers
            )
        except ClientDisconnected:
            return ("slow_client" if listener.cut else "client_disconnected"), None
        except SourceError as exc:
            await sink.end()
            return "input_error", str(exc)
        except asyncio.CancelledError:
            if not (self._interrupting or listener.cut):
                raise
            uncancel()
            if listener.cut:
                return "slow_client", None
            await self._end_now(sink)
            return "interrupted", None
        if listener.cut:
            return "slow_client", None
        await sink.end()
        return "complete", None

    @staticmethod
    async def _end_now(sink: ASGISink) -> None:
        # Interrupted: a client that does not read must not hold up the exit.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(END_TIMEOUT):
                await sink.end()

    def _left(self, reason: str, error: str | None) -> None:
        """A client is done: does the run end with it?"""
        if self._tasks:
            return
        if self._interrupting:
            self._finish("interrupted")
        elif self.hub.error is not None:
            self._finish("input_error", self.hub.error)
        elif self.keep:
            return
        elif self.hub.ended:
            self._finish("complete")
        else:  # abandoned before the end: stop reading the source
            self.hub.stop()
            self._finish(reason, error)


def ui_page(**settings: str) -> str:
    """The `/ui` page (sserelay/ui.html) with its `{{name}}` settings filled in, HTML-escaped."""
    page = resources.files("sserelay").joinpath("ui.html").read_text(encoding="utf-8")
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


def create_app(stream: Callable[[Scope, Receive, Send], Any], ui: str | None = None) -> Starlette:
    """The app: the event stream at `/` and `/events`, `ok` at `/healthz`,
    and the page `ui` (HTML) at `/ui` if given."""

    async def ui_endpoint(request: Request) -> Response:
        return HTMLResponse(ui or "", headers=UI_HEADERS)

    routes = [
        Route("/", stream, methods=["GET", "OPTIONS"]),
        Route("/events", stream, methods=["GET", "OPTIONS"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if ui is not None:
        routes.append(Route("/ui", ui_endpoint, methods=["GET"]))
    return Starlette(routes=routes)
