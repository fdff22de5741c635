"""The replay endpoint of `sserelay serve RECORDING --as recorded`: a recorded API, offline.

Each request gets the recorded exchange it matches (sserelay.record.replay.Cassette: by
method, path and body hash, then in order), replayed as it was recorded: its status, its
headers and its bytes, written as they were (with `--realtime`, at the recorded times).
An app's SDK pointed here sees, for the same requests, the answers the real API gave when
the recording was made. A request that no exchange answers gets a 404 in the error shape of
the API its path is for; an answer that was cut when it was recorded is cut again, at the
same place, so the client sees the same truncated stream.

Every replayed request is a row of the bill, metered as the proxy metered it (the same
relays read the same bytes): its events, the tokens of the text inside the payloads, the
usage the recorded API reported. `/healthz` is answered here; with `--cors-origin`, so are
preflights.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sserelay.errors import ClientDisconnected, Interrupted
from sserelay.http.access import Access
from sserelay.http.asgi import (
    ASGISink,
    BodyTooLarge,
    healthz,
    read_body,
    send_response,
    unless,
)
from sserelay.http.endpoint import Endpoint, Outcome, answer_error
from sserelay.metering.bill import RequestFacts
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.errors import api_of_path
from sserelay.providers.payloads import PayloadMeter
from sserelay.providers.requests import read_json_request, requested_model
from sserelay.record.format import Exchange, body_sha256, kept_headers
from sserelay.record.replay import Cassette, no_match_message
from sserelay.sources.pacing import Pacer
from sserelay.streaming.relays import EventRelay, Relay, relay_for
from sserelay.streaming.stream import relay_frames
from sserelay.wire.frames import Frames


class Player(Endpoint):
    """The ASGI endpoint of `serve RECORDING --as recorded`; each request is a row of the
    bill (and, with `once`, the run's one request). `pacer` makes each request's pacer
    (`--realtime`, `--rate`, `--delay`), None to replay as fast as the client reads."""

    def __init__(
        self,
        cassette: Cassette,
        meter: Meter,
        *,
        tokenizer: Tokenizer,
        pacer: Callable[[], Pacer] | None = None,
        heartbeat: float | None = None,
        once: bool = False,
        access: Access | None = None,
    ) -> None:
        super().__init__(meter, access=access, once=once)
        self.cassette = cassette
        self.tokenizer = tokenizer
        self.pacer = pacer
        self.heartbeat = heartbeat

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        api = api_of_path(scope["path"])
        method, path = scope["method"], scope["path"]
        if method == "OPTIONS" and self.access.cors_origin:
            # A browser's preflight: the recorded API's own was never recorded.
            headers = self.access.preflight_headers("GET, POST, PUT, PATCH, DELETE")
            await send_response(send, 204, b"", b"text/plain", headers)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await self.refuse(scope, send, refusal, api)
            return
        cors = self.access.cors_headers
        try:
            body = await unless(read_body(receive, self.max_body), self.stop)
        except BodyTooLarge as exc:
            await answer_error(send, 413, str(exc), api, headers=cors)
            return
        if body is None:
            return  # gone (or shutting down) before it asked anything: nothing to bill
        refusal = self.refusal(scope)  # again: with --once, another may have been taken
        if refusal is not None:
            await self.refuse(scope, send, refusal, api)
            return
        # No await from the check above to the claim in serve_client().
        digest = body_sha256(body)
        exchange = self.cassette.match(method, path, digest)
        if exchange is None:
            message = no_match_message(method, path, digest)
            await answer_error(send, 404, message, api, code="no_recorded_exchange", headers=cors)
            return
        model = requested_model(read_json_request(body))
        await self.serve_client(
            scope,
            lambda client: self._replay(exchange, scope, receive, send, client),
            request=RequestFacts(method, path, model, exchange.status),
            unforeseen=(Reason.INPUT_ERROR, "the replay failed unexpectedly"),
        )

    async def _replay(
        self, exchange: Exchange, scope: Scope, receive: Receive, send: Send, client: ClientMeter
    ) -> Outcome:
        sink = ASGISink(receive, send, scope)
        sink.status = exchange.status
        relay = relay_for(
            exchange.content_type,
            exchange.status,
            PayloadMeter(),
            self.tokenizer,
            keep_comments=True,
        )
        # Recorded without the transport's headers; a hand-edited file may still hold them.
        headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in kept_headers(exchange.headers)
        ]
        sse = isinstance(relay, EventRelay)
        try:
            await relay_frames(
                sink,
                self._frames(exchange, relay),
                client=client,
                heartbeat=self.heartbeat if sse else None,
                headers=[*headers, *self.access.cors_headers],
                stop=self.stop,
            )
        except ClientDisconnected:
            return Reason.CLIENT_DISCONNECTED, None
        except Interrupted:
            return Reason.INTERRUPTED, None
        finally:
            client.upstream_usage = relay.payload.usage
            client.update_request(model=relay.payload.model)
        if not exchange.complete:
            # Cut where the recording is cut: uvicorn closes a response left unfinished.
            return Reason.UPSTREAM_ERROR, f"recorded exchange {exchange.number} was cut short"
        await sink.end()
        return Reason.COMPLETE, None

    async def _frames(self, exchange: Exchange, relay: Relay) -> AsyncIterator[Frames]:
        """The recorded writes, those made at one time in one flush, metered by `relay`,
        each when the pacer says."""
        pacer = self.pacer() if self.pacer is not None else None
        for at, parts in itertools.groupby(exchange.parts, key=lambda part: part.t):
            wire = b"".join(part.wire() for part in parts)
            counted = relay.decode(wire)
            if pacer is not None:
                await _until(pacer.next_time(counted.tokens, at, time.monotonic()))
            yield Frames(wire, counted.events, counted.tokens)
        tail = relay.flush()
        if tail.events or tail.tokens:
            yield Frames(b"", tail.events, tail.tokens)
        if pacer is not None and pacer.realtime and exchange.ended_at is not None:
            # The recorded answer stayed open a while after its last write: so does this one.
            await _until(pacer.next_time(0, exchange.ended_at, time.monotonic()))


async def _until(due: float) -> None:
    wait = due - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)


def create_player_app(player: Player) -> Starlette:
    """`ok` at `/healthz`; every other path and method is replayed by `player`."""
    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", player),
        ]
    )
