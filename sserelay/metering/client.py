"""What was written to one client (`ClientMeter`), its request id, and the observer hook
(`MeterObserver`) that hears of it (pure). The `Meter` (meter.py) holds them."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace

from sserelay.metering.bill import ClientBill, RequestFacts
from sserelay.metering.budget import Allowance
from sserelay.metering.pricing import Pricing
from sserelay.metering.reason import Reason
from sserelay.metering.usage import Usage

#: The longest request id kept; a client's own `x-request-id` longer than this is not used.
MAX_REQUEST_ID = 200


def new_request_id() -> str:
    """A fresh request id: `req_` and 24 random hex digits (96 bits)."""
    return "req_" + secrets.token_hex(12)


def is_valid_request_id(text: str) -> bool:
    """Whether a client's own `x-request-id` may be a request's id: 1 to MAX_REQUEST_ID
    printable ASCII characters (a hostile header cannot put control characters in a
    ledger, a log line or a response header)."""
    return 0 < len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable()


Clock = Callable[[], float]
#: Called with each write a client's connection accepted: (client, events, tokens, bytes).
OnWrite = Callable[["ClientMeter", int, int, int], None]


class MeterObserver:
    """Hears what the meter bills. Override the hooks you need; the others cost nothing."""

    def opened(self, client: ClientMeter) -> None:
        """A client (a stream, a request) has started."""

    def wrote(self, client: ClientMeter, events: int, tokens: int, nbytes: int) -> None:
        """A write reached the client's connection (called on the per-event path: keep it
        to a few additions)."""

    def closed(self, bill: ClientBill) -> None:
        """A client has ended; `bill` is its final account."""


class ClientMeter:
    """What one client has been written so far. Cheap to update per write."""

    __slots__ = (
        "_clock",
        "_on_write",
        "allowance",
        "bytes",
        "closed_at",
        "error",
        "events",
        "first_event_at",
        "id",
        "key",
        "last_event_id",
        "opened_at",
        "peer",
        "reason",
        "request",
        "request_id",
        "started_wall",
        "tail",
        "tokenizer",
        "tokens",
        "upstream_usage",
    )

    def __init__(
        self,
        client_id: int,
        peer: str,
        clock: Clock,
        request: RequestFacts | None = None,
        on_write: tuple[OnWrite, ...] = (),
    ) -> None:
        self._clock = clock
        self._on_write = on_write
        self.id = client_id
        self.peer = peer
        self.tokens = 0
        #: Tokens a BPE count holds back after the last write (billed if it ends there).
        self.tail = 0
        self.events = 0
        self.bytes = 0
        self.reason: Reason | None = None
        self.error: str | None = None
        self.opened_at = clock()
        self.first_event_at: float | None = None
        self.closed_at: float | None = None
        #: What a request was (`serve --as`, `proxy`); None for a `serve` client.
        self.request = request
        #: What the upstream reported for this request, if anything.
        self.upstream_usage: Usage | None = None
        #: The request id (sent to the client as `x-request-id`; the ledger row's id).
        self.request_id = ""
        #: The name of the key the client presented (None: no keys in use).
        self.key: str | None = None
        #: The budget its stream takes from, where its key has one.
        self.allowance: Allowance | None = None
        #: When it started, as a time of day (Unix seconds): the ledger's `started_at`.
        self.started_wall = 0.0
        #: The id of the last event it was sent, where events have ids.
        self.last_event_id: str | None = None
        #: The tokenizer that counted it, where it is the request's own (`--tokenizer
        #: auto`), and whether that count is an estimate (a model whose vendor's tokenizer
        #: is not public).
        self.tokenizer: tuple[str, bool] | None = None

    def record(self, events: int, tokens: int, nbytes: int, pending: int = 0) -> None:
        """Count a write that the client's connection has accepted. `pending` is what the
        count holds back after it (see Frames.pending): it replaces the last write's."""
        if self.first_event_at is None and events:
            self.first_event_at = self._clock()
        self.events += events
        self.tokens += tokens
        self.bytes += nbytes
        self.tail = pending
        if self._on_write:
            for notify in self._on_write:
                notify(self, events, tokens, nbytes)

    def close(self, reason: str, error: str | None = None) -> bool:
        """End this client's tally; the first reason given wins (True if this one did).
        `Meter.close()` is the way to close a client and tell the observers."""
        if self.reason is not None:
            return False
        self.reason = Reason(reason)
        self.error = error
        self.closed_at = self._clock()
        return True

    @property
    def active(self) -> bool:
        return self.reason is None

    @property
    def billed_tokens(self) -> int:
        """The tokens of the text written so far: counted, and held back by the count."""
        return self.tokens + self.tail

    @property
    def model(self) -> str | None:
        return None if self.request is None else self.request.model

    def update_request(self, *, model: str | None = None, status: int | None = None) -> None:
        """Say which model answered, or the upstream's status (a request's only)."""
        if self.request is None:
            return
        if model is not None and model != self.request.model:
            self.request = replace(self.request, model=model)
        if status is not None:
            self.request = replace(self.request, status=status)

    def bill(self, now: float, pricing: Pricing | None = None) -> ClientBill:
        end = self.closed_at if self.closed_at is not None else now
        tokens = self.billed_tokens
        cost = (pricing or Pricing()).cost(tokens, self.upstream_usage, self.model)
        return ClientBill(
            id=self.id,
            peer=self.peer,
            tokens=tokens,
            events=self.events,
            bytes=self.bytes,
            reason=self.reason or Reason.INTERRUPTED,
            duration_s=round(end - self.opened_at, 6),
            time_to_first_event_s=(
                None
                if self.first_event_at is None
                else round(self.first_event_at - self.opened_at, 6)
            ),
            request=self.request,
            upstream_usage=self.upstream_usage,
            cost=cost,
            error=self.error,
            request_id=self.request_id,
            key=self.key,
            tokenizer=self.tokenizer,
            started_wall=self.started_wall,
            last_event_id=self.last_event_id,
        )
