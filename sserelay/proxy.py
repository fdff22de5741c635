"""The `proxy` endpoint: each request forwarded to the upstream, its answer relayed and metered.

Reverse-proxy semantics: `METHOD /path?query` with its body and end-to-end
headers goes to the upstream URL joined with that path (`/` is the URL
itself). Every request is independent: its own upstream response, relay,
payload meter and row of the bill. `/healthz` is answered here, not forwarded.

One task per request watches for the client's disconnect from the moment the
request body is in: a client that leaves while the upstream is still
connecting, or mid-stream, gets its upstream response closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .asgi import (
    ASGISink,
    OnFinished,
    Outcome,
    RequestEndpoint,
    healthz,
    read_body,
    uncancel,
    watch_disconnect,
)
from .errors import ClientDisconnected, RequestError, UpstreamError, UpstreamTimeout
from .formats import PayloadMeter
from .meter import ClientMeter, Meter
from .prices import PriceList
from .recorder import Recorder
from .recording import Header
from .relays import BodyRelay, EventRelay, LineRelay
from .stream import Frames, relay_frames
from .tokens import Tokenizer
from .upstream import Headers, Upstream, UpstreamResponse

T = TypeVar("T")
Relay = EventRelay | LineRelay | BodyRelay


class _WatchedSink(ASGISink):
    """An ASGISink whose disconnect the proxy watches itself, from the moment
    the request body is in: a client that leaves while the upstream is still
    connecting must close that connection too. Only that watcher may read
    `receive`, so the sink waits for it to set `gone`."""

    async def wait_disconnected(self) -> None:
        await self.gone.wait()


class Proxy(RequestEndpoint):
    """The ASGI endpoint of `sserelay proxy`; each proxied request is a row of
    the bill (and, with `once`, the run's one request)."""

    def __init__(
        self,
        upstream: Upstream,
        meter: Meter,
        *,
        tokenizer: Tokenizer,
        payload: str = "auto",
        keep_comments: bool = False,
        include_usage: bool = False,
        heartbeat: float | None = None,
        prices: PriceList | None = None,
        once: bool = False,
        on_finished: OnFinished = lambda client, error: None,
        recorder: Recorder | None = None,
    ) -> None:
        PayloadMeter(payload)  # an unknown kind is a ValueError now, not per request
        super().__init__(meter, once=once, on_finished=on_finished)
        self.upstream = upstream
        self.tokenizer = tokenizer
        self.payload = payload
        self.keep_comments = keep_comments
        self.include_usage = include_usage
        self.heartbeat = heartbeat
        self.prices = prices
        self.recorder = recorder
        self._secrets = sorted(upstream.secrets, key=len, reverse=True)

    def redact(self, text: str) -> str:
        """`text` with every configured secret replaced by `***`."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self.closed:
            busy = "already proxied its one request (--once)" if self.once else "shutting down"
            await PlainTextResponse(f"sserelay: {busy}\n", status_code=503)(scope, receive, send)
            return
        try:
            # Refused before it is billed and before any upstream connection.
            self.upstream.url_for(scope.get("raw_path") or scope["path"].encode(), b"")
        except RequestError as exc:
            await PlainTextResponse(f"sserelay: bad request: {exc}\n", status_code=400)(
                scope, receive, send
            )
            return
        await self._bill_request(
            scope,
            lambda client: self._forward(scope, receive, send, client),
            unforeseen=("upstream_error", "the proxy failed unexpectedly"),
        )

    def _ended(self, error: str | None) -> str | None:
        return None if error is None else self.redact(error)

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, client: ClientMeter
    ) -> Outcome:
        sink = _WatchedSink(receive, send)
        watcher: asyncio.Task[None] | None = None
        response: UpstreamResponse | None = None
        relay: Relay | None = None
        frames: AsyncGenerator[Frames, None] | None = None
        recorder = self.recorder if self.recorder is not None and self.recorder.claim() else None
        try:
            body = await read_body(receive)
            if body is None:
                return "client_disconnected", None
            body, strip_usage, model = self._prepare(body)
            client.model = model
            watcher = asyncio.create_task(watch_disconnect(receive, sink.gone))
            try:
                response = await _unless(
                    sink.gone,
                    self.upstream.open(
                        scope["method"],
                        scope.get("raw_path") or scope["path"].encode(),
                        scope.get("query_string", b""),
                        scope["headers"],
                        body,
                    ),
                )
            except UpstreamError as exc:
                status = 504 if isinstance(exc, UpstreamTimeout) else 502
                await _plain(send, status, f"sserelay: upstream error: {exc}\n")
                return "upstream_error", str(exc)
            if response is None:
                return "client_disconnected", None
            client.upstream_status = response.status
            sink.status = response.status
            relay, headers = self._relay_for(response, strip_usage)
            progress = _Progress()
            if recorder is not None:
                recorder.start(
                    Header(scope["method"], scope["path"], response.status, response.content_type)
                )
            frames = self._frames(
                response, relay, client, progress, None if recorder is None else recorder.write
            )
            try:
                await relay_frames(
                    sink,
                    frames,
                    client=client,
                    heartbeat=self.heartbeat if isinstance(relay, EventRelay) else None,
                    headers=headers,
                )
            except ClientDisconnected:
                # A client that leaves once it has the end of the answer ([DONE],
                # message_stop, ...) got all of it, whatever the upstream still sends.
                return ("complete" if progress.end_delivered else "client_disconnected"), None
            except UpstreamError as exc:
                # Cut the client's connection instead of ending the response: like
                # nginx when its upstream dies, so the client can tell it is truncated.
                # (uvicorn closes a connection whose app returns before the end.)
                return "upstream_error", str(exc)
            await sink.end()
            if response.status >= 400:
                return "upstream_error", self._status_error(response, relay)
            return "complete", None
        except asyncio.CancelledError:
            if not self._interrupting:
                raise
            uncancel()
            if not sink.started:
                await _plain(send, 503, "sserelay: shutting down\n")
            return "interrupted", None  # a started response is cut, as above
        finally:
            if frames is not None:
                # relay_frames() closes it, unless it is cut before it starts or
                # cancelled again while closing: close it here too (a no-op if done).
                await frames.aclose()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if response is not None:
                await response.aclose()
            if relay is not None:
                self._settle(client, relay)

    def _prepare(self, body: bytes) -> tuple[bytes, bool, str | None]:
        """The body to send, whether to strip the usage chunk, the model asked for."""
        try:
            request = json.loads(body) if body else None
        except (ValueError, RecursionError):
            return body, False, None
        if not isinstance(request, dict):
            return body, False, None
        model = request.get("model") if isinstance(request.get("model"), str) else None
        if not self.include_usage:
            return body, False, model
        rewritten = ask_for_usage(request)
        if rewritten is None:
            return body, False, model
        return json.dumps(rewritten, ensure_ascii=False).encode(), True, model

    def _relay_for(self, response: UpstreamResponse, strip_usage: bool) -> tuple[Relay, Headers]:
        payload = PayloadMeter(self.payload)
        kind = response.content_type
        headers = response.headers
        if response.status >= 400:
            return BodyRelay(payload, self.tokenizer, meter=False), headers
        if kind == "text/event-stream":
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            if not any(n == b"x-accel-buffering" for n, _ in headers):
                headers.append((b"x-accel-buffering", b"no"))
            relay: Relay = EventRelay(
                payload,
                self.tokenizer,
                keep_comments=self.keep_comments,
                strip_usage=strip_usage,
            )
            return relay, headers
        if kind == "application/json" or kind.endswith("+json"):
            return BodyRelay(payload, self.tokenizer), headers
        text = kind.startswith("text/") and self.payload in ("auto", "raw")
        return LineRelay(payload, self.tokenizer, text=text), headers

    async def _frames(
        self,
        response: UpstreamResponse,
        relay: Relay,
        client: ClientMeter,
        progress: _Progress,
        record: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Frames, None]:
        """What each upstream read completes, for relay_frames() to write in one
        flush; `record` is given each write once the client has it."""
        payload = relay.payload
        async for chunk in response.chunks():
            frames = relay.decode(chunk)
            if payload.model is not None:
                client.model = payload.model
            if frames.payload:
                yield frames
                # relay_frames asks for more only once these were flushed to the client.
                progress.end_delivered = payload.done
                if record is not None:
                    record(frames.payload)
            if relay.failure is not None:
                raise relay.failure
        tail = relay.flush()
        if relay.failure is not None:
            raise relay.failure
        # The tail's bytes went out with earlier chunks; only its count is new.
        if tail.events or tail.tokens:
            client.record(tail.events, tail.tokens, 0)

    def _settle(self, client: ClientMeter, relay: Relay) -> None:
        """Copy what the upstream reported onto the request's bill row."""
        usage = relay.payload.usage
        client.upstream_usage = None if usage is None else usage.to_dict()
        client.model = relay.payload.model or client.model
        self.meter.invalid_utf8_bytes += relay.invalid_utf8_bytes
        if self.prices is not None:
            price = self.prices.for_model(client.model)
            if price is not None:
                client.prices = (price.input, price.output)

    def _status_error(self, response: UpstreamResponse, relay: Relay) -> str:
        message = f"upstream answered {response.status} {response.reason}".rstrip()
        detail = _error_detail(relay.text) if isinstance(relay, BodyRelay) else ""
        return f"{message}: {detail}" if detail else message


class _Progress:
    """How far one request got: whether the answer's terminal payload reached the client."""

    __slots__ = ("end_delivered",)

    def __init__(self) -> None:
        self.end_delivered = False


def ask_for_usage(request: dict[str, Any]) -> dict[str, Any] | None:
    """`request` with `stream_options.include_usage` set, if it is a streaming
    OpenAI-style chat request that did not ask for usage itself; else None."""
    if request.get("stream") is not True or not isinstance(request.get("messages"), list):
        return None
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return {**request, "stream_options": options}


def _error_detail(body: str) -> str:
    """A short reason from an error body: its JSON error message, else its first line."""
    text = body.strip()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        error = obj.get("error")
        for candidate in (
            error.get("message") if isinstance(error, dict) else error,
            obj.get("message"),
            obj.get("detail"),
        ):
            if isinstance(candidate, str) and candidate.strip():
                text = candidate
                break
    line = " ".join(text.split())
    return line if len(line) <= 160 else line[:157] + "..."


async def _unless(gone: asyncio.Event, awaitable: Awaitable[T]) -> T | None:
    """The result of `awaitable`, or None (and `awaitable` cancelled) if `gone` is set first."""
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                await task
    if not task.done() or task.cancelled():
        return None
    if gone.is_set() and task.exception() is not None:
        return None  # the client left: whatever went wrong upstream is no longer its error
    return task.result()


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_proxy_app(proxy: Proxy) -> Starlette:
    """`ok` at `/healthz`; every other path and method goes to `proxy`."""
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", proxy),
        ]
    )
