"""The `proxy` endpoint: each request forwarded to the upstream, its answer relayed and metered.

Reverse-proxy semantics: `METHOD /path?query` with its body and end-to-end
headers goes to the upstream URL joined with that path (`/` is the URL
itself). Every request is independent: its own upstream response, relay,
payload meter and row of the bill. `/healthz` is answered here, not forwarded.

One task per request watches for the client's disconnect from the moment the
request body is in: a client that leaves while the upstream is still
connecting, or mid-stream, gets its upstream response closed at once.
Errors sserelay answers itself are in the error shape of the API the request
was for (by its path), so the client's SDK can say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sserelay.errors import (
    BudgetExhausted,
    ClientDisconnected,
    Interrupted,
    RequestError,
    UpstreamError,
    UpstreamTimeout,
)
from sserelay.http.access import SECRET_HEADERS, Access, Keys
from sserelay.http.asgi import (
    ASGISink,
    BodyTooLarge,
    healthz,
    read_body,
    send_response,
    unless,
    watch_disconnect,
)
from sserelay.http.endpoint import (
    Endpoint,
    Outcome,
    answer_error,
    budget_message,
    request_id_header,
    resolve_tokenizer,
)
from sserelay.http.proxy_express import Progress, express_lane
from sserelay.metering.bill import RequestFacts
from sserelay.metering.keys import Key
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.errors import api_of_path, error_detail
from sserelay.providers.payloads import PayloadMeter
from sserelay.providers.requests import ask_for_usage, read_json_request, requested_model
from sserelay.record.recorder import ExchangeRecorder, Recorder
from sserelay.secrecy import Redactor
from sserelay.sources.upstream import Headers, Upstream, UpstreamResponse, redact_url
from sserelay.streaming.relays import BodyRelay, EventRelay, Relay, relay_for
from sserelay.streaming.stream import relay_frames
from sserelay.wire.frames import Frames


class _Moment(asyncio.Event):
    """An Event that notes when it was first set (perf_counter seconds)."""

    at: float | None = None

    def set(self) -> None:
        if self.at is None:
            self.at = time.perf_counter()
        super().set()


class _WatchedSink(ASGISink):
    """An ASGISink whose disconnect the proxy watches itself, from the moment
    the request body is in: a client that leaves while the upstream is still
    connecting must close that connection too. Only that watcher may read
    `receive`, so the sink waits for it to set `gone`. `left_at` is when the
    proxy learned the client had left (a watcher's read, or a write refused)."""

    def __init__(self, receive: Receive, send: Send, scope: Scope) -> None:
        super().__init__(receive, send, scope)
        self._gone = _Moment()
        self.gone = self._gone
        self.left_at: float | None = None

    async def flush(self) -> bool:
        delivered = await super().flush()
        if not delivered and self.left_at is None:
            self.left_at = time.perf_counter()
        return delivered

    async def wait_disconnected(self) -> None:
        await self.gone.wait()

    @property
    def left(self) -> float | None:
        moments = [at for at in (self.left_at, self._gone.at) if at is not None]
        return min(moments, default=None)


class Proxy(Endpoint):
    """The ASGI endpoint of `sserelay proxy`; each proxied request is a row of
    the bill (and, with `once`, the run's one request)."""

    def __init__(
        self,
        upstream: Upstream,
        meter: Meter,
        *,
        tokenizer: str,
        payload: str = "auto",
        keep_comments: bool = False,
        include_usage: bool = False,
        heartbeat: float | None = None,
        once: bool = False,
        recorder: Recorder | None = None,
        access: Access | None = None,
        redactor: Redactor | None = None,
        keys: Keys | None = None,
        on_upstream_closed: Callable[[float], None] | None = None,
    ) -> None:
        PayloadMeter(payload)  # an unknown kind is a ValueError now, not per request
        super().__init__(meter, access=access, once=once, keys=keys)
        self.upstream = upstream
        self.tokenizer = tokenizer
        self.payload = payload
        self.keep_comments = keep_comments
        self.include_usage = include_usage
        self.heartbeat = heartbeat
        self.recorder = recorder
        self.redactor = redactor or Redactor(upstream.secrets)
        #: hears how long the upstream took to close after its client left (seconds)
        self.on_upstream_closed = on_upstream_closed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        api = api_of_path(scope["path"])
        if scope["method"] == "OPTIONS" and self.access.cors_origin:
            # A browser's preflight is ours to answer: the upstream never sees the page.
            headers = self.access.preflight_headers("GET, POST, PUT, PATCH, DELETE")
            await send_response(send, 204, b"", b"text/plain", headers)
            return
        key, refusal = self.identify(scope)
        if refusal is not None:
            await self.refuse(scope, send, refusal, api, key=key)
            return
        try:
            # Refused before it is billed and before any upstream connection.
            self.upstream.url_for(scope.get("raw_path") or scope["path"].encode(), b"")
        except RequestError as exc:
            await answer_error(
                send, 400, f"bad request: {exc}", api, headers=self.access.cors_headers
            )
            return
        await self.serve_client(
            scope,
            lambda client: self._forward(scope, receive, send, client, api, key),
            request=RequestFacts(scope["method"], scope["path"]),
            unforeseen=(Reason.UPSTREAM_ERROR, "the proxy failed unexpectedly"),
            key=key,
        )

    def redact(self, text: str) -> str:
        return self.redactor.redact(text)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        client: ClientMeter,
        api: str,
        key: Key | None,
    ) -> Outcome:
        sink = _WatchedSink(receive, send, scope)
        # Every answer names its request: its id is the ledger row's and the receipt's.
        cors = (*self.access.cors_headers, request_id_header(client))
        watcher: asyncio.Task[None] | None = None
        response: UpstreamResponse | None = None
        relay: Relay | None = None
        frames: AsyncGenerator[Frames, None] | None = None
        recording: ExchangeRecorder | None = None
        if self.recorder is not None:
            recording = self.recorder.exchange(scope["method"], scope["path"])
        whole = False  # whether the client got the whole answer (for the recording)
        try:
            try:
                body = await unless(read_body(receive, self.max_body), self.stop)
            except BodyTooLarge as exc:
                await answer_error(send, 413, str(exc), api, headers=cors)
                return Reason.CLIENT_DISCONNECTED, str(exc)
            if body is None:
                if self.stopping:
                    await answer_error(send, 503, "shutting down", api, headers=cors)
                    return Reason.INTERRUPTED, None
                return Reason.CLIENT_DISCONNECTED, None
            sent = body  # as the client sent it: a replay matches requests by it
            body, strip_usage, model = self._prepare(body)
            client.update_request(model=model)
            refusal = self.admit(key, model)
            if refusal is not None:  # a model the key may not use, a spent budget, a limit
                await answer_error(
                    send,
                    refusal.status,
                    refusal.message,
                    api,
                    code=str(refusal.reason),
                    headers=(*cors, *refusal.headers),
                )
                return Reason(str(refusal.reason)), refusal.message
            headers_in, query = self._forwarded(scope)
            watcher = asyncio.create_task(watch_disconnect(receive, sink.gone))
            try:
                response = await unless(
                    self.upstream.open(
                        scope["method"],
                        scope.get("raw_path") or scope["path"].encode(),
                        query,
                        headers_in,
                        body,
                    ),
                    sink.gone,
                    self.stop,
                )
            except UpstreamError as exc:
                status = 504 if isinstance(exc, UpstreamTimeout) else 502
                message = f"upstream error: {self.redactor.redact(str(exc))}"
                await answer_error(send, status, message, api, headers=cors)
                return Reason.UPSTREAM_ERROR, str(exc)
            if response is None:
                if self.stopping and not sink.gone.is_set():
                    await answer_error(send, 503, "shutting down", api, headers=cors)
                    return Reason.INTERRUPTED, None
                return Reason.CLIENT_DISCONNECTED, None
            client.update_request(status=response.status)
            raw_path = scope.get("raw_path") or scope["path"].encode()
            if response.status == 404 and self.upstream.doubled_prefix(raw_path):
                # The upstream's own 404 would not say why: this one does.
                await response.aclose()
                hint = self._doubled_hint(raw_path)
                await answer_error(send, 404, f"upstream answered 404: {hint}", api, headers=cors)
                return Reason.UPSTREAM_ERROR, self._status_error(response, relay, raw_path)
            sink.status = response.status
            tokenizer, estimate = await resolve_tokenizer(self.tokenizer, model)
            client.tokenizer = tokenizer.name, estimate
            gated = client.allowance is not None
            relay, headers = self._relay_for(response, strip_usage, tokenizer, hold=gated)
            gate = self.gate(client, api, sse=response.content_type == "text/event-stream")
            progress = Progress()
            if recording is not None:
                recording.start(sent, response.status, headers)
            frames = self._frames(
                response, relay, client, progress, None if recording is None else recording.write
            )
            try:
                await relay_frames(
                    sink,
                    frames,
                    client=client,
                    heartbeat=self.heartbeat if isinstance(relay, EventRelay) else None,
                    headers=[*_renamed_request_id(headers), *cors],
                    stop=self.stop,
                    gate=gate,
                    # A whole answer a budget may refuse goes out only once it fits.
                    lazy_start=gate is not None and isinstance(relay, BodyRelay),
                    express=express_lane(
                        response,
                        relay,
                        client,
                        progress,
                        None if recording is None else recording.write,
                    ),
                )
            except ClientDisconnected:
                # A client that leaves once it has the end of the answer ([DONE],
                # message_stop, ...) got all of it, whatever the upstream still sends.
                if progress.end_delivered:
                    whole = True
                    return Reason.COMPLETE, None
                return Reason.CLIENT_DISCONNECTED, None
            except BudgetExhausted as exc:
                # The upstream is closed at once (the finally below), as for a client that
                # leaves; the client gets its API's error and a clean end.
                if exc.started:
                    await sink.end()
                else:
                    await answer_error(
                        send, 429, budget_message(client), api, code="budget_exhausted",
                        headers=cors,
                    )  # fmt: skip
                return Reason.BUDGET_EXHAUSTED, None
            except (UpstreamError, Interrupted) as exc:
                # Cut the client's connection instead of ending the response: like
                # nginx when its upstream dies, so the client can tell it is truncated.
                # (uvicorn closes a connection whose app returns before the end.)
                if isinstance(exc, Interrupted):
                    return Reason.INTERRUPTED, None
                return Reason.UPSTREAM_ERROR, str(exc)
            await sink.end()
            whole = True
            if response.status >= 400:
                return Reason.UPSTREAM_ERROR, self._status_error(response, relay, raw_path)
            return Reason.COMPLETE, None
        finally:
            if recording is not None:
                recording.end(complete=whole)
            if frames is not None:
                # relay_frames() closes it, unless it is cut before it starts: close it
                # here too (a no-op if done).
                await frames.aclose()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if response is not None:
                await response.aclose()
            if self.on_upstream_closed is not None and sink.left is not None:
                self.on_upstream_closed(time.perf_counter() - sink.left)
            if relay is not None:
                self._settle(client, relay)

    def _prepare(self, body: bytes) -> tuple[bytes, bool, str | None]:
        """The body to send, whether to strip the usage chunk, the model asked for."""
        request = read_json_request(body)
        model = requested_model(request)
        if request is None or not self.include_usage:
            return body, False, model
        rewritten = ask_for_usage(request)
        if rewritten is None:
            return body, False, model
        return json.dumps(rewritten, ensure_ascii=False).encode(), True, model

    def _forwarded(self, scope: Scope) -> tuple[Headers, bytes]:
        """The client's headers and query to forward. Where the relay checks clients' keys,
        the client's own credential never reaches the upstream: its credential headers and
        `key`/`token` parameters are dropped (the upstream's comes from --upstream-header)."""
        headers: Headers = list(scope["headers"])
        query: bytes = scope.get("query_string", b"")
        if self.keys is None:
            return headers, query
        headers = [(n, v) for n, v in headers if n.lower() not in SECRET_HEADERS]
        kept = [
            part
            for part in query.split(b"&")
            if part and part.partition(b"=")[0] not in (b"key", b"token")
        ]
        return headers, b"&".join(kept)

    def _relay_for(
        self, response: UpstreamResponse, strip_usage: bool, tokenizer: Tokenizer, *, hold: bool
    ) -> tuple[Relay, Headers]:
        relay = relay_for(
            response.content_type,
            response.status,
            PayloadMeter(self.payload),
            tokenizer,
            keep_comments=self.keep_comments,
            strip_usage=strip_usage,
            text=self.payload in ("auto", "raw"),
            hold=hold,
        )
        headers = response.headers
        if isinstance(relay, EventRelay):
            headers = [(n, v) for n, v in headers if n != b"content-length"]
            if not any(n == b"x-accel-buffering" for n, _ in headers):
                headers.append((b"x-accel-buffering", b"no"))
        return relay, headers

    async def _frames(
        self,
        response: UpstreamResponse,
        relay: Relay,
        client: ClientMeter,
        progress: Progress,
        record: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Frames, None]:
        """What each upstream read completes, for relay_frames() to write in one
        flush; `record` is given each write once the client has it."""
        payload = relay.payload
        model = None
        async for chunk in response.chunks():
            frames = relay.decode(chunk)
            if payload.model != model:  # once per request, as a rule, not once per read
                model = payload.model
                client.update_request(model=model)
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
        if tail.payload:  # a whole answer held back for a budget: it goes now, checked
            yield tail
            progress.end_delivered = True
            if record is not None:
                record(tail.payload)
        elif tail.events or tail.tokens:
            # The tail's bytes went out with earlier chunks; only its count is new.
            client.record(tail.events, tail.tokens, 0)

    def _settle(self, client: ClientMeter, relay: Relay) -> None:
        """Copy what the upstream reported onto the request's bill row."""
        client.upstream_usage = relay.payload.usage
        client.update_request(model=relay.payload.model)
        self.meter.invalid_utf8_bytes += relay.invalid_utf8_bytes

    def _status_error(
        self, response: UpstreamResponse, relay: Relay | None, raw_path: bytes
    ) -> str:
        message = f"upstream answered {response.status} {response.reason}".rstrip()
        called = redact_url(self.upstream.url_for(raw_path, b""))
        message += f" for {self.redactor.redact(called)}"
        detail = error_detail(relay.text) if isinstance(relay, BodyRelay) else ""
        if response.status == 404 and self.upstream.doubled_prefix(raw_path):
            detail = self._doubled_hint(raw_path)
        return f"{message}: {detail}" if detail else message

    def _doubled_hint(self, raw_path: bytes) -> str:
        base = self.upstream.base.raw_path.partition(b"?")[0].rstrip(b"/").decode()
        return (
            f"the path starts with {base} again, which --upstream already ends in: "
            f"point the client's base URL at this proxy without {base}"
        )


def _renamed_request_id(headers: Headers) -> Headers:
    """The upstream's own `x-request-id` (OpenAI's, say) kept as `x-upstream-request-id`:
    the client's `x-request-id` is the gateway's. Its `date` goes: the server adds one, and
    two `date` headers are one too many."""
    return [
        (b"x-upstream-request-id" if name == b"x-request-id" else name, value)
        for name, value in headers
        if name != b"date"
    ]


def create_proxy_app(proxy: Proxy) -> Starlette:
    """`ok` at `/healthz`; every other path and method goes to `proxy`."""
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", proxy),
        ]
    )
