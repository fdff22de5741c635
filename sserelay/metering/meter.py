"""Running tallies of what was written to each client, and the immutable Bill.

A Meter holds one ClientMeter per client. The streaming layer records each
write after it has been handed to the client's connection, never before, so a
bill always equals what was actually written, however the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Why a stream (or a whole run) ended; the bill's `reason`.
REASONS = (
    "complete",
    "client_disconnected",
    "interrupted",
    "upstream_error",
    "input_error",
    "slow_client",
)

Clock = Callable[[], float]


class ClientMeter:
    """What one client has been written so far. Cheap to update per write."""

    __slots__ = (
        "_clock",
        "bytes",
        "closed_at",
        "events",
        "first_event_at",
        "id",
        "method",
        "model",
        "opened_at",
        "path",
        "peer",
        "prices",
        "reason",
        "tokens",
        "upstream_status",
        "upstream_usage",
    )

    def __init__(self, client_id: int, peer: str, clock: Clock) -> None:
        self._clock = clock
        self.id = client_id
        self.peer = peer
        self.tokens = 0
        self.events = 0
        self.bytes = 0
        self.reason: str | None = None
        self.opened_at = clock()
        self.first_event_at: float | None = None
        self.closed_at: float | None = None
        # A proxied request (`sserelay proxy`) also says what it was and what the upstream said.
        self.method: str | None = None
        self.path: str | None = None
        self.model: str | None = None
        self.upstream_status: int | None = None
        self.upstream_usage: dict[str, int | None] | None = None
        #: (input, output) price per 1M tokens for this request's model; else the run's --price.
        self.prices: tuple[float, float] | None = None

    def record(self, events: int, tokens: int, nbytes: int) -> None:
        """Count a write that the client's connection has accepted."""
        if self.first_event_at is None and events:
            self.first_event_at = self._clock()
        self.events += events
        self.tokens += tokens
        self.bytes += nbytes

    def close(self, reason: str) -> None:
        """End this client's tally; the first reason given wins."""
        if self.reason is None:
            self.reason = reason
            self.closed_at = self._clock()

    @property
    def active(self) -> bool:
        return self.reason is None

    def cost(self, price_per_million: float | None) -> float | None:
        """With model prices: the reported input tokens at the input price plus the metered
        tokens at the output price. Otherwise the metered tokens at `price_per_million`."""
        if self.prices is None:
            return cost_of(self.tokens, price_per_million)
        input_price, output_price = self.prices
        prompt = (self.upstream_usage or {}).get("input_tokens") or 0
        return round((prompt * input_price + self.tokens * output_price) / 1_000_000, 10)

    def bill(self, now: float, price_per_million: float | None = None) -> ClientBill:
        end = self.closed_at if self.closed_at is not None else now
        return ClientBill(
            id=self.id,
            peer=self.peer,
            tokens=self.tokens,
            events=self.events,
            bytes=self.bytes,
            reason=self.reason or "interrupted",
            duration_s=round(end - self.opened_at, 6),
            time_to_first_event_s=(
                None
                if self.first_event_at is None
                else round(self.first_event_at - self.opened_at, 6)
            ),
            method=self.method,
            path=self.path,
            model=self.model,
            upstream_status=self.upstream_status,
            upstream_usage=self.upstream_usage,
            cost=self.cost(price_per_million),
        )


@dataclass(frozen=True, slots=True)
class ClientBill:
    """One client's share of the bill."""

    id: int
    peer: str
    tokens: int
    events: int
    bytes: int
    reason: str
    duration_s: float
    time_to_first_event_s: float | None
    # Set for a proxied request only (see ClientMeter).
    method: str | None = None
    path: str | None = None
    model: str | None = None
    upstream_status: int | None = None
    upstream_usage: dict[str, int | None] | None = None
    cost: float | None = None

    @property
    def partial(self) -> bool:
        """The client got less than the whole stream."""
        return self.reason != "complete"


@dataclass(frozen=True, slots=True)
class Totals:
    """A live snapshot for the counter display."""

    tokens: int
    events: int
    bytes: int
    elapsed_s: float
    active_clients: int
    clients: int
    cost: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def cost_of(tokens: int, price_per_million: float | None) -> float | None:
    """Cost of `tokens` at `price_per_million` (currency per 1M tokens), or None."""
    if price_per_million is None:
        return None
    return round(tokens * price_per_million / 1_000_000, 10)


@dataclass(frozen=True, slots=True)
class Bill:
    """The final account of a run. Totals are sums over `clients`."""

    reason: str
    tokens: int
    events: int
    bytes: int
    duration_s: float
    time_to_first_event_s: float | None
    tokenizer: str
    price_per_million: float | None
    cost: float | None
    clients: tuple[ClientBill, ...]
    invalid_utf8_bytes: int = 0
    upstream_usage: dict[str, Any] | None = field(default=None)

    @property
    def tokens_per_s(self) -> float:
        return round(self.tokens / self.duration_s, 3) if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The bill as JSON-ready data; keys are the documented contract."""
        out: dict[str, Any] = {
            "reason": self.reason,
            "tokens": self.tokens,
            "events": self.events,
            "bytes": self.bytes,
            "duration_s": self.duration_s,
            "time_to_first_event_s": self.time_to_first_event_s,
            "tokens_per_s": self.tokens_per_s,
            "tokenizer": self.tokenizer,
            "price_per_million": self.price_per_million,
            "cost": self.cost,
            "invalid_utf8_bytes": self.invalid_utf8_bytes,
            "clients": [_client_dict(c) for c in self.clients],
        }
        if self.upstream_usage is not None:
            out["upstream_usage"] = self.upstream_usage
        return out


def _client_dict(c: ClientBill) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": c.id,
        "peer": c.peer,
        "tokens": c.tokens,
        "events": c.events,
        "bytes": c.bytes,
        "reason": c.reason,
        "duration_s": c.duration_s,
        "time_to_first_event_s": c.time_to_first_event_s,
    }
    if c.method is not None:  # a proxied request
        out.update(
            method=c.method,
            path=c.path,
            model=c.model,
            upstream_status=c.upstream_status,
            upstream_usage=c.upstream_usage,
            partial=c.partial,
            cost=c.cost,
        )
    return out


def sum_usage(reports: list[dict[str, int | None]]) -> dict[str, int | None] | None:
    """Per-field sums of several requests' upstream usage; a field no request
    reported stays None (not 0); None when there is no report at all."""
    if not reports:
        return None
    keys = dict.fromkeys(key for report in reports for key in report)
    out: dict[str, int | None] = {}
    for key in keys:
        values = [v for report in reports if (v := report.get(key)) is not None]
        out[key] = sum(values) if values else None
    return out


class Meter:
    """Tallies for every client of one run. `clock` is injected for tests."""

    def __init__(
        self,
        tokenizer: str = "whitespace",
        price_per_million: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.tokenizer = tokenizer
        self.price_per_million = price_per_million
        self._clock = clock
        self.started_at = clock()
        self.clients: list[ClientMeter] = []
        self.invalid_utf8_bytes = 0
        self.upstream_usage: dict[str, Any] | None = None

    def open_client(self, peer: str = "") -> ClientMeter:
        client = ClientMeter(len(self.clients) + 1, peer, self._clock)
        self.clients.append(client)
        return client

    def _cost(self, tokens: int) -> float | None:
        # With per-model prices (proxy --prices) the cost is the sum of each request's.
        if not any(c.prices is not None for c in self.clients):
            return cost_of(tokens, self.price_per_million)
        costs = [c.cost(self.price_per_million) for c in self.clients]
        return round(sum(cost for cost in costs if cost is not None), 10)

    def totals(self) -> Totals:
        tokens = sum(c.tokens for c in self.clients)
        return Totals(
            tokens=tokens,
            events=sum(c.events for c in self.clients),
            bytes=sum(c.bytes for c in self.clients),
            elapsed_s=self._clock() - self.started_at,
            active_clients=sum(1 for c in self.clients if c.active),
            clients=len(self.clients),
            cost=self._cost(tokens),
        )

    def bill(self, reason: str) -> Bill:
        """Close the account. Clients still open are closed with `reason`."""
        if reason not in REASONS:
            raise ValueError(f"unknown bill reason {reason!r}")
        now = self._clock()
        for client in self.clients:
            client.close(reason)
        clients = tuple(c.bill(now, self.price_per_million) for c in self.clients)
        tokens = sum(c.tokens for c in clients)
        firsts = [c.time_to_first_event_s for c in clients if c.time_to_first_event_s is not None]
        return Bill(
            reason=reason,
            tokens=tokens,
            events=sum(c.events for c in clients),
            bytes=sum(c.bytes for c in clients),
            duration_s=round(now - self.started_at, 6),
            time_to_first_event_s=min(firsts) if firsts else None,
            tokenizer=self.tokenizer,
            price_per_million=self.price_per_million,
            cost=self._cost(tokens),
            clients=clients,
            invalid_utf8_bytes=self.invalid_utf8_bytes,
            upstream_usage=(
                self.upstream_usage
                if self.upstream_usage is not None
                else sum_usage([c.upstream_usage for c in clients if c.upstream_usage is not None])
            ),
        )
