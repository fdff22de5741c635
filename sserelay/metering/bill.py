"""The immutable accounts: one client's `ClientBill`, a run's `Bill`, a live `Totals` (pure).

`Bill.to_dict()` is the bill's JSON, a documented contract (DESIGN.md, "CLI contract").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sserelay.metering.reason import Reason
from sserelay.metering.usage import Usage


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a request was (a proxied or mocked one): its method and path (never the query:
    keys travel there), the model it named or was answered by, and the upstream's status
    (None until an upstream answered)."""

    method: str
    path: str
    model: str | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class ClientBill:
    """One client's share of the bill: a stream of `serve`, or one request."""

    id: int
    peer: str
    tokens: int
    events: int
    bytes: int
    reason: Reason
    duration_s: float
    time_to_first_event_s: float | None
    #: Set for a request (`serve --as`, `proxy`); None for a `serve` client.
    request: RequestFacts | None = None
    upstream_usage: Usage | None = None
    cost: float | None = None
    #: Why it ended badly, in one line (never a secret); None if it did not.
    error: str | None = None
    #: The request id (the client's `x-request-id`, or one made for it).
    request_id: str = ""
    #: The name of the key the client presented, where keys are in use.
    key: str | None = None
    #: When it started, as a time of day (Unix seconds).
    started_wall: float = 0.0
    #: The id of the last event it was sent, where events have ids.
    last_event_id: str | None = None
    #: The tokenizer that counted it and whether the count is an estimate, where the
    #: request had its own (`--tokenizer auto`).
    tokenizer: tuple[str, bool] | None = None

    @property
    def partial(self) -> bool:
        """The client got less than the whole stream."""
        return self.reason != Reason.COMPLETE

    @property
    def model(self) -> str | None:
        return None if self.request is None else self.request.model

    @property
    def usage_source(self) -> str:
        """`reported` when the upstream said what it billed (the cost is from that), else
        `metered` (sserelay's own count)."""
        return (
            "reported"
            if self.upstream_usage is not None and self.upstream_usage.reported
            else "metered"
        )

    @property
    def apart(self) -> float | None:
        """How far the metered tokens are from the output tokens the upstream reported
        (0.12: 12%), where both are known; a gap past 10% is worth a look."""
        usage = self.upstream_usage
        if usage is None or not usage.output_tokens:
            return None
        return abs(self.tokens - usage.output_tokens) / usage.output_tokens

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "peer": self.peer,
            "tokens": self.tokens,
            "events": self.events,
            "bytes": self.bytes,
            "reason": str(self.reason),
            "duration_s": self.duration_s,
            "time_to_first_event_s": self.time_to_first_event_s,
            "request_id": self.request_id,
        }
        if self.key is not None:
            out["key"] = self.key
        if self.tokenizer is not None:
            out["tokenizer"], out["estimate"] = self.tokenizer
        if self.request is not None:
            out.update(
                method=self.request.method,
                path=self.request.path,
                model=self.request.model,
                upstream_status=self.request.status,
                upstream_usage=None
                if self.upstream_usage is None
                else self.upstream_usage.to_dict(),
                partial=self.partial,
                cost=self.cost,
                usage_source=self.usage_source,
            )
        return out


@dataclass(frozen=True, slots=True)
class Totals:
    """A live snapshot for the counter display."""

    tokens: int
    events: int
    bytes: int
    #: seconds since the first byte any client got (0 before it)
    elapsed_s: float
    active_clients: int
    clients: int
    cost: float | None
    #: tokens per second over the last few seconds (RATE_WINDOW), not since the start: a
    #: proxy idle for an hour still shows what it does now
    recent_rate: float | None = None

    @property
    def tokens_per_s(self) -> float:
        if self.recent_rate is not None:
            return self.recent_rate
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Bill:
    """The final account of a run. Totals are sums over `clients`."""

    reason: Reason
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
    upstream_usage: Usage | None = None
    #: How many clients the run had (`clients` lists them all only up to a limit).
    client_count: int = 0
    #: Requests whose model has no price (their cost is null, not 0).
    unpriced: int = 0
    #: Requests whose upstream reported their usage.
    reported_requests: int = 0
    #: Sums per model and per key: requests, tokens, events, bytes, cost.
    by_model: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    by_key: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return round(self.tokens / self.duration_s, 3) if self.duration_s > 0 else 0.0

    @property
    def usage_source(self) -> str:
        """`reported` when every request's usage was reported by its upstream (the totals'
        costs are from those reports), else `metered`."""
        return (
            "reported"
            if self.reported_requests and self.reported_requests == self.client_count
            else "metered"
        )

    @property
    def rows_omitted(self) -> int:
        """Clients the bill does not list one by one (their rows are in the ledger)."""
        return self.client_count - len(self.clients)

    def to_dict(self) -> dict[str, Any]:
        """The bill as JSON-ready data; keys are the documented contract."""
        out: dict[str, Any] = {
            "reason": str(self.reason),
            "tokens": self.tokens,
            "events": self.events,
            "bytes": self.bytes,
            "duration_s": self.duration_s,
            "time_to_first_event_s": self.time_to_first_event_s,
            "tokens_per_s": self.tokens_per_s,
            "tokenizer": self.tokenizer,
            "usage_source": self.usage_source,
            "price_per_million": self.price_per_million,
            "cost": self.cost,
            "invalid_utf8_bytes": self.invalid_utf8_bytes,
            "clients": [client.to_dict() for client in self.clients],
        }
        if self.upstream_usage is not None:
            out["upstream_usage"] = self.upstream_usage.to_dict()
        if self.rows_omitted:
            out["clients_total"] = self.client_count
        if self.unpriced:
            out["unpriced_requests"] = self.unpriced
        if self.by_model:
            out["by_model"] = self.by_model
        if self.by_key:
            out["by_key"] = self.by_key
        return out
