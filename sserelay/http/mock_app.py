"""The mock LLM endpoint of `sserelay serve FILE --as PROVIDER`.

Each completion request gets the whole text anew, in the provider's own
streaming format (sserelay.providers.answers), one delta per chunk, flushed as it is
read: an official SDK pointed at the mock cannot tell it from the real API.
Every request is its own row of the bill, metered exactly as written: its
events, the tokens of the text it carried, its bytes; a client that hangs up
mid-stream is `client_disconnected` with what it had got.

Requests are served until Ctrl-C or SIGTERM (or, with `once`, until the first
completion request ends). `GET /v1/models` lists the one model; `/healthz`
answers `ok`. Paths work with and without the `/v1` prefix, so a base URL with
or without it fits.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sserelay.errors import ClientDisconnected, Interrupted, SourceError
from sserelay.http.access import Access
from sserelay.http.asgi import (
    MAX_REQUEST_BODY,
    ASGISink,
    BodyTooLarge,
    healthz,
    read_body,
    send_json,
    send_response,
    unless,
)
from sserelay.http.endpoint import Endpoint, Outcome, answer_error, request_id_header
from sserelay.metering.bill import ClientBill, RequestFacts
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.answers import (
    Answer,
    MockRequest,
    encode_json,
    models_list,
    new_answer,
    read_request,
)
from sserelay.sources.pacing import Counted, Pacer, paced
from sserelay.sources.shared import Pass, Text
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

    With `line_ends`, each chunk is a line whose line end is given back (`\\n`),
    so the deltas join to the file's text."""

    def __init__(
        self,
        provider: str,
        text: Text,
        meter: Meter,
        *,
        tokenizer: Tokenizer,
        line_ends: bool = True,
        pacer: Callable[[], Pacer] | None = None,
        heartbeat: float | None = None,
        once: bool = False,
        access: Access | None = None,
    ) -> None:
        if provider not in COMPLETION_PATHS:
            raise ValueError(f"unknown provider {provider!r}")
        super().__init__(meter, access=access, once=once)
        self.provider = provider
        self.text = text
        self.tokenizer = tokenizer
        self.line_ends = line_ends
        self.pacer = pacer
        self.heartbeat = heartbeat

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.access.authorize(scope)
        if refusal is not None:
            await self.refuse(send, refusal, self.provider)
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
        refusal = self.refusal(scope)
        if refusal is not None:
            await self.refuse(send, refusal, self.provider)
            return
        try:
            body = await unless(read_body(receive, MAX_REQUEST_BODY), self.stop)
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
        refusal = self.refusal(scope)  # again: with --once, another may have been taken
        if refusal is not None:
            await self.refuse(send, refusal, self.provider)
            return
        # No await from the check above to the claim in serve_client().
        await self.serve_client(
            scope,
            lambda client: self._answer(request, scope, receive, send, client),
            request=RequestFacts(scope["method"], scope["path"], request.model),
            unforeseen=(Reason.INPUT_ERROR, "the mock failed unexpectedly"),
        )

    def _ended(self, bill: ClientBill) -> None:
        # A file's count is its own (read anew each time); stdin's grows as it is read.
        self.meter.invalid_utf8_bytes = self.text.invalid_utf8_bytes
        super()._ended(bill)

    async def _answer(
        self, request: MockRequest, scope: Scope, receive: Receive, send: Send, client: ClientMeter
    ) -> Outcome:
        answer = new_answer(self.provider, request, secrets.token_hex(12), int(time.time()))
        prompt_tokens = sum(self.tokenizer.count(text) for text in request.prompt)
        try:
            passes = await self.text.open()
        except SourceError as exc:
            client.update_request(status=500)
            await answer_error(send, 500, str(exc), self.provider)
            return Reason.INPUT_ERROR, str(exc)
        client.update_request(status=200)  # the status the answer goes out with
        sink = ASGISink(receive, send, scope)
        if request.stream:
            frames = self._stream(answer, passes, prompt_tokens)
            headers: list[tuple[bytes, bytes]] = [*SSE_HEADERS, *self.access.cors_headers]
        else:
            frames = self._whole(answer, passes, prompt_tokens)
            headers = [*JSON_HEADERS, *self.access.cors_headers]
        headers.append(request_id_header(client))
        try:
            await relay_frames(
                sink,
                frames,
                client=client,
                heartbeat=self.heartbeat if request.stream else None,
                headers=headers,
                stop=self.stop,
            )
        except ClientDisconnected:
            return Reason.CLIENT_DISCONNECTED, None
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
        self, answer: Answer, passes: Pass, prompt_tokens: int
    ) -> AsyncIterator[Frames]:
        """The opening events at once, one event per chunk as each read makes it
        ready (or as the pacer says: each request is paced on its own), then the
        closing events with the usage."""
        counter = self.tokenizer.counter()
        pacer = self.pacer() if self.pacer is not None else None
        completion_tokens = 0

        async def counted() -> AsyncIterator[Counted]:
            async for batch in passes:
                at = None
                if isinstance(batch, TimedBatch):
                    at, batch = batch.at, batch.chunks
                chunks = self._chunks(batch)
                yield chunks, [counter.feed(chunk) for chunk in chunks], at

        try:
            yield _frames(answer.start())
            async for chunks, tokens in paced(counted(), pacer):
                events = [event for chunk in chunks for event in answer.text(chunk)]
                if events:
                    completion_tokens += sum(tokens)
                    yield _frames(events, sum(tokens))
        finally:
            await passes.aclose()
        yield _frames(answer.end(prompt_tokens, completion_tokens))

    async def _whole(
        self, answer: Answer, passes: Pass, prompt_tokens: int
    ) -> AsyncIterator[Frames]:
        """One answer object once the text has ended (unpaced): one event, all its tokens."""
        parts: list[str] = []
        try:
            async for batch in passes:
                parts += self._chunks(batch.chunks if isinstance(batch, TimedBatch) else batch)
        finally:
            await passes.aclose()
        text = "".join(parts)
        tokens = self.tokenizer.counter().feed(text)
        yield Frames(encode_json(answer.whole(text, prompt_tokens, tokens)), 1, tokens)


def _frames(events: list[Event], tokens: int = 0) -> Frames:
    payload = b"".join(encode_event(event) for event in events)
    return Frames(payload, len(events), tokens)


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
