"""Running tallies of what was written to each client, and the observer hook (pure).

A Meter holds one ClientMeter per client. The streaming layer records each write after the
client's connection has accepted it, never before, so a bill always equals what was actually
written, however the stream ends.

**One observer hook.** Everything that wants to know what is billed — receipts, the live
view, the bill, the ledger, metrics, budgets — subscribes a `MeterObserver` to the Meter:
it hears of each client as it opens, of each write (only observers that override `wrote`
are called, so the per-event path pays nothing for the others), and of each client's
`ClientBill` as `Meter.close()` closes it. Nothing is called from the per-event path by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from sserelay.metering.bill import Bill, ClientBill, RequestFacts, Totals
from sserelay.metering.pricing import Pricing
from sserelay.metering.reason import REASONS, Reason
from sserelay.metering.usage import Usage, sum_usage

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
        "bytes",
        "closed_at",
        "error",
        "events",
        "first_event_at",
        "id",
        "opened_at",
        "peer",
        "reason",
        "request",
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

    def record(self, events: int, tokens: int, nbytes: int) -> None:
        """Count a write that the client's connection has accepted."""
        if self.first_event_at is None and events:
            self.first_event_at = self._clock()
        self.events += events
        self.tokens += tokens
        self.bytes += nbytes
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
        cost = (pricing or Pricing()).cost(self.tokens, self.upstream_usage, self.model)
        return ClientBill(
            id=self.id,
            peer=self.peer,
            tokens=self.tokens,
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
        )


class Meter:
    """Tallies for every client of one run, and the observers that hear of them.
    `clock` is injected for tests."""

    def __init__(
        self,
        tokenizer: str = "whitespace",
        price_per_million: float | None = None,
        clock: Clock = time.monotonic,
        *,
        pricing: Pricing | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.pricing = pricing if pricing is not None else Pricing(price_per_million)
        self._clock = clock
        self.started_at = clock()
        self.clients: list[ClientMeter] = []
        self.invalid_utf8_bytes = 0
        self._observers: list[MeterObserver] = []
        self._on_write: tuple[OnWrite, ...] = ()

    @property
    def price_per_million(self) -> float | None:
        return self.pricing.per_million

    def now(self) -> float:
        """The meter's clock."""
        return self._clock()

    def subscribe(self, observer: MeterObserver) -> None:
        """Tell `observer` of every client opened, write recorded and client closed from now on."""
        self._observers.append(observer)
        if type(observer).wrote is not MeterObserver.wrote:
            self._on_write = (*self._on_write, observer.wrote)

    def open_client(self, peer: str = "", request: RequestFacts | None = None) -> ClientMeter:
        client = ClientMeter(len(self.clients) + 1, peer, self._clock, request, self._on_write)
        self.clients.append(client)
        for observer in self._observers:
            observer.opened(client)
        return client

    def close(self, client: ClientMeter, reason: str, error: str | None = None) -> ClientBill:
        """Close `client` with `reason` (the first reason wins) and tell the observers, once."""
        first = client.close(reason, error)
        bill = client.bill(self._clock(), self.pricing)
        if first:
            for observer in self._observers:
                observer.closed(bill)
        return bill

    def _cost(self, tokens: int, clients: list[ClientMeter]) -> float | None:
        return self.pricing.total(
            tokens,
            ((self.pricing.cost(c.tokens, c.upstream_usage, c.model), c.model) for c in clients),
        )

    def totals(self) -> Totals:
        tokens = sum(c.tokens for c in self.clients)
        return Totals(
            tokens=tokens,
            events=sum(c.events for c in self.clients),
            bytes=sum(c.bytes for c in self.clients),
            elapsed_s=self._clock() - self.started_at,
            active_clients=sum(1 for c in self.clients if c.active),
            clients=len(self.clients),
            cost=self._cost(tokens, self.clients),
        )

    def bill(self, reason: str) -> Bill:
        """Close the account. Clients still open are closed with `reason`."""
        if reason not in REASONS:
            raise ValueError(f"unknown bill reason {reason!r}")
        now = self._clock()
        clients = tuple(self.close(client, reason) for client in self.clients)
        tokens = sum(c.tokens for c in clients)
        firsts = [c.time_to_first_event_s for c in clients if c.time_to_first_event_s is not None]
        return Bill(
            reason=Reason(reason),
            tokens=tokens,
            events=sum(c.events for c in clients),
            bytes=sum(c.bytes for c in clients),
            duration_s=round(now - self.started_at, 6),
            time_to_first_event_s=min(firsts) if firsts else None,
            tokenizer=self.tokenizer,
            price_per_million=self.price_per_million,
            cost=self._cost(tokens, self.clients),
            clients=clients,
            invalid_utf8_bytes=self.invalid_utf8_bytes,
            upstream_usage=sum_usage(
                c.upstream_usage for c in clients if c.upstream_usage is not None
            ),
        )
