"""The mock LLM endpoint of `sserelay serve FILE --as PROVIDER`.

Each completion request gets the whole text anew, in the provider's own
streaming format (sserelay.providers.answers), one delta per chunk, flushed as it is
read: an official SDK pointed at the mock cannot tell it from the real API.
Every request is its own row of the bill, metered exactly as written: its
events, the tokens of the text it carried, its bytes; a client that hangs up
mid-stream is `client_disconnected` with what it had got.

Behind a recording, each completion request gets the text of the recorded exchange it
matches (sserelay.record.replay.Cassette), re-rendered in the provider's format; one no
exchange answers gets a 404, and a recorded error answer is given back in the provider's
error shape, with its status and message.

Requests are served until Ctrl-C or SIGTERM (or, with `once`, until the first
completion request ends). `GET /v1/models` lists the one model; `/healthz`
answers `ok`. Paths work with and without the `/v1` prefix, so a base URL with
or without it fits.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sserelay.errors import BudgetExhausted, ClientDisconnected, Interrupted, SourceError
from sserelay.http.access import Access, Keys
from sserelay.http.asgi import (
    ASGISink,
    BodyTooLarge,
    healthz,
    read_body,
    send_json,
    send_response,
    unless,
)
from sserelay.http.endpoint import (
    Endpoint,
    Outcome,
    answer_error,
    budget_message,
    request_id_header,
    resolve_tokenizer,
)
from sserelay.metering.bill import ClientBill, RequestFacts
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import TokenCounter, Tokenizer
from sserelay.providers.answers import (
    Answer,
    MockRequest,
    encode_json,
    models_list,
    new_answer,
    read_request,
)
from sserelay.providers.errors import error_body, error_detail
from sserelay.record.format import body_sha256
from sserelay.record.replay import Cassette, ExchangeSource, no_match_message
from sserelay.sources.pacing import Counted, Pacer, paced
from sserelay.sources.shared import FileText, Pass, Text
from sserelay.sources.text import TimedBatch
from sserelay.streaming.stream import SSE_HEADERS, relay_frames
from sserelay.wire.frames import Frames
from sserelay.wire.sse import Event, encode_event

JSON_HEADERS = ((b"content-type", b"application/json"),)

#: The completion route of each provider (also served without the `/v1` prefix).
COMPLETION_PATHS = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "openai-responses": "/v1/responses",
}


class Mock(Endpoint):
    """The ASGI endpoint of `serve --as PROVIDER`; each completion request is a
    row of the bill (and, with `once`, the run's one request).

    It answers with `text`, or with the recorded exchange each request matches in a
    Cassette. With `line_ends`, each chunk is a line whose line end is given back (`\\n`),
    so the deltas join to the file's text."""

    def __init__(
        self,
        provider: str,
        text: Text | Cassette,
        meter: Meter,
        *,
        tokenizer: str,
        line_ends: bool = True,
        pacer: Callable[[], Pacer] | None = None,
        heartbeat: float | None = None,
        once: bool = False,
        access: Access | None = None,
        keys: Keys | None = None,
    ) -> None:
        if provider not in COMPLETION_PATHS:
            raise ValueError(f"unknown provider {provider!r}")
        super().__init__(meter, access=access, once=once, keys=keys)
        self.provider = provider
        self.text = text
        self.tokenizer = tokenizer
        self.line_ends = line_ends
        self.pacer = pacer
        self.heartbeat = heartbeat

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope)
        if refusal is not None:
            await self.refuse(scope, send, refusal, self.provider)
            return
        await send_json(send, 200, models_list(self.provider), self.access.cors_headers)

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "OPTIONS":
            await self.preflight(scope, receive, send)
            return
        path = COMPLETION_PATHS[self.provider]
        message = f"--as {self.provider} answers POST {path} and GET /v1/models"
        await answer_error(send, 404, message, self.provider, headers=self.access.cors_headers)

    async def preflight(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self.access.preflight_headers("GET, POST")
        await send_response(send, 204, b"", b"text/plain", headers)

    async def complete(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A completion request: stream (or send whole) the text, metered."""
        if scope["method"] == "OPTIONS":
            await self.preflight(scope, receive, send)
            return
        key, refusal = self.identify(scope)
        if refusal is not None:
            await self.refuse(scope, send, refusal, self.provider, key=key)
            return
        try:
            body = await unless(read_body(receive, self.max_body), self.stop)
        except BodyTooLarge as exc:
            await answer_error(send, 413, str(exc), self.provider)
            return
        if body is None:
            return  # gone (or shutting down) before it asked anything: nothing to bill
        try:
            request = read_request(self.provider, body)
        except ValueError as exc:
            await answer_error(send, 400, str(exc), self.provider)
            return
        facts = RequestFacts(scope["method"], scope["path"], request.model)
        # Again: with --once, another may have been taken; and now the model is known.
        refusal = self.refusal(scope) or self.admit(key, request.model)
        if refusal is not None:
            await self.refuse(scope, send, refusal, self.provider, request=facts, key=key)
            return
        # No await from the check above to the claim in serve_client().
        text = self.text
        if isinstance(text, Cassette):
            recorded = self._recorded(text, scope["method"], scope["path"], body)
            if isinstance(recorded, tuple):
                await send_json(send, *recorded, self.access.cors_headers)
                return
            text = recorded
        await self.serve_client(
            scope,
            lambda client: self._answer(request, text, scope, receive, send, client),
            request=facts,
            unforeseen=(Reason.INPUT_ERROR, "the mock failed unexpectedly"),
            key=key,
        )

    def _recorded(
        self, cassette: Cassette, method: str, path: str, body: bytes
    ) -> Text | tuple[int, dict[str, Any]]:
        """The text of the recorded exchange this request matches, or the error to answer
        (its status and body): none matches, or what was recorded is an error answer."""
        digest = body_sha256(body)
        exchange = cassette.match(method, path, digest)
        if exchange is None:
            message = f"sserelay: {no_match_message(method, path, digest)}"
            error = error_body(self.provider, message, status=404, code="no_recorded_exchange")
            return 404, error
        if exchange.status >= 400:
            recorded = b"".join(part.wire() for part in exchange.parts)
            detail = error_detail(recorded.decode("utf-8", errors="replace"))
            message = detail or f"the recorded answer was an error {exchange.status}"
            return exchange.status, error_body(self.provider, message, status=exchange.status)
        return FileText(lambda: ExchangeSource(exchange, as_text=True))

    def _ended(self, bill: ClientBill) -> None:
        # A file's count is its own (read anew each time); stdin's grows as it is read.
        if not isinstance(self.text, Cassette):
            self.meter.invalid_utf8_bytes = self.text.invalid_utf8_bytes
        super()._ended(bill)

    async def _answer(
        self,
        request: MockRequest,
        text: Text,
        scope: Scope,
        receive: Receive,
        send: Send,
        client: ClientMeter,
    ) -> Outcome:
        answer = new_answer(self.provider, request, secrets.token_hex(12), int(time.time()))
        tokenizer, estimate = await resolve_tokenizer(self.tokenizer, request.model)
        client.tokenizer = tokenizer.name, estimate
        prompt_tokens = sum(tokenizer.count(part) for part in request.prompt)
        counter = tokenizer.counter()
        try:
            passes = await text.open()
        except SourceError as exc:
            client.update_request(status=500)
            await answer_error(send, 500, str(exc), self.provider)
            return Reason.INPUT_ERROR, str(exc)
        client.update_request(status=200)  # the status the answer goes out with
        sink = ASGISink(receive, send, scope)
        if request.stream:
            frames = self._stream(answer, passes, prompt_tokens, counter, tokenizer.holds_back)
            headers: list[tuple[bytes, bytes]] = [*SSE_HEADERS, *self.access.cors_headers]
        else:
            frames = self._whole(answer, passes, prompt_tokens, tokenizer)
            headers = [*JSON_HEADERS, *self.access.cors_headers]
        headers.append(request_id_header(client))
        gate = self.gate(client, self.provider)
        try:
            await relay_frames(
                sink,
                frames,
                client=client,
                heartbeat=self.heartbeat if request.stream else None,
                headers=headers,
                stop=self.stop,
                gate=gate,
                # A whole answer a budget may refuse goes out (headers too) only once it fits.
                lazy_start=gate is not None and not request.stream,
            )
        except ClientDisconnected:
            return Reason.CLIENT_DISCONNECTED, None
        except BudgetExhausted as exc:
            if exc.started:
                await sink.end()
            else:
                message = budget_message(client)
                code = "budget_exhausted"
                await answer_error(send, 429, message, self.provider, code=code)
            return Reason.BUDGET_EXHAUSTED, None
        except (SourceError, Interrupted) as exc:
            # The answer has started: it is cut (uvicorn closes a response left
            # unfinished), so the client can tell it is truncated.
            return Reason(exc.reason or Reason.INPUT_ERROR), (
                str(exc) if isinstance(exc, SourceError) else None
            )
        finally:
            await passes.aclose()  # also when the answer never started reading it
        await sink.end()
        return Reason.COMPLETE, None

    def _chunks(self, batch: Sequence[str]) -> Sequence[str]:
        return [chunk + "\n" for chunk in batch] if self.line_ends else batch

    async def _stream(
        self,
        answer: Answer,
        passes: Pass,
        prompt_tokens: int,
        counter: TokenCounter,
        holds_back: bool,
    ) -> AsyncIterator[Frames]:
        """The opening events at once, one event per chunk as each read makes it
        ready (or as the pacer says: each request is paced on its own), then the
        closing events with the usage. The deltas are counted over the joined text;
        what a BPE count holds back is billed with the closing events (or, if the client
        leaves first, as the tail of what it was sent)."""
        pacer = self.pacer() if self.pacer is not None else None
        completion_tokens = 0

        async def counted() -> AsyncIterator[Counted]:
            async for batch in passes:
                at = None
                if isinstance(batch, TimedBatch):
                    at, batch = batch.at, batch.chunks
                chunks = self._chunks(batch)
                tokens, pendings = [], []
                for chunk in chunks:
                    tokens.append(counter.feed(chunk))
                    if holds_back:
                        pendings.append(counter.pending())
                yield chunks, tokens, at, pendings

        try:
            yield _frames(answer.start())
            async for chunks, tokens, pending in paced(counted(), pacer):
                events = [event for chunk in chunks for event in answer.text(chunk)]
                if events:
                    completion_tokens += sum(tokens)
                    yield _frames(events, sum(tokens), pending)
        finally:
            await passes.aclose()
        rest = counter.flush()
        completion_tokens += rest
        yield _frames(answer.end(prompt_tokens, completion_tokens), rest)

    async def _whole(
        self, answer: Answer, passes: Pass, prompt_tokens: int, tokenizer: Tokenizer
    ) -> AsyncIterator[Frames]:
        """One answer object once the text has ended (unpaced): one event, all its tokens."""
        parts: list[str] = []
        try:
            async for batch in passes:
                parts += self._chunks(batch.chunks if isinstance(batch, TimedBatch) else batch)
        finally:
            await passes.aclose()
        text = "".join(parts)
        tokens = tokenizer.count(text)
        yield Frames(encode_json(answer.whole(text, prompt_tokens, tokens)), 1, tokens)


def _frames(events: list[Event], tokens: int = 0, pending: int = 0) -> Frames:
    payload = b"".join(encode_event(event) for event in events)
    return Frames(payload, len(events), tokens, pending)


def create_mock_app(mock: Mock) -> Starlette:
    """The completion route (with and without `/v1`), `GET /v1/models`, `/healthz`,
    and a provider-shaped 404 for anything else."""
    path = COMPLETION_PATHS[mock.provider]
    short = path.removeprefix("/v1")
    complete = _ASGI(mock.complete)
    return Starlette(
        routes=[
            Route(path, complete, methods=["POST"]),
            Route(short, complete, methods=["POST"]),
            Route("/v1/models", _ASGI(mock.models), methods=["GET"]),
            Route("/models", _ASGI(mock.models), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", _ASGI(mock.not_found)),
        ]
    )


class _ASGI:
    """A raw ASGI endpoint for a Route (starlette would take a bare method for a
    request-response function)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
