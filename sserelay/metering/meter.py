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
from collections import deque

from sserelay.metering.bill import Bill, ClientBill, RequestFacts, Totals
from sserelay.metering.pricing import Pricing
from sserelay.metering.reason import REASONS, Reason
from sserelay.metering.usage import Usage, sum_usage

from .client import (
    MAX_REQUEST_ID,
    ClientMeter,
    Clock,
    MeterObserver,
    OnWrite,
    is_valid_request_id,
    new_request_id,
)

__all__ = [
    "MAX_BILL_ROWS",
    "MAX_GROUPS",
    "MAX_REQUEST_ID",
    "OTHER",
    "RATE_WINDOW",
    "ClientMeter",
    "Meter",
    "MeterObserver",
    "Summary",
    "is_valid_request_id",
    "new_request_id",
]

#: Seconds the live tokens/s is measured over.
RATE_WINDOW = 10.0
#: A bill lists each client's row up to this many clients; past it, totals and per-model
#: and per-key sums (the rows themselves are in the ledger). Memory stays flat however
#: long a relay runs.
MAX_BILL_ROWS = 100
#: Distinct models (or keys) summed apart; more are summed as "other", so a client that
#: names a million models cannot grow the meter.
MAX_GROUPS = 1000
OTHER = "other"


class Summary:
    """Running sums over the clients that have ended (and a group's share of them)."""

    __slots__ = (
        "bytes",
        "clients",
        "cost",
        "events",
        "first_event_s",
        "reported",
        "tokens",
        "unpriced",
    )

    def __init__(self, priced: bool = False) -> None:
        self.clients = 0
        self.tokens = 0
        self.events = 0
        self.bytes = 0
        #: 0 from the start where every token has a price (a flat --price), else None
        #: until something is priced: an unpriced run's cost is unknown, not 0.
        self.cost: float | None = 0.0 if priced else None
        self.unpriced = 0
        self.reported = 0
        self.first_event_s: float | None = None

    def add(self, bill: ClientBill) -> None:
        self.clients += 1
        self.tokens += bill.tokens
        self.events += bill.events
        self.bytes += bill.bytes
        if bill.cost is not None:
            self.cost = round((self.cost or 0.0) + bill.cost, 10)
        elif bill.request is not None:
            self.unpriced += 1
        if bill.usage_source == "reported":
            self.reported += 1
        first = bill.time_to_first_event_s
        if first is not None and (self.first_event_s is None or first < self.first_event_s):
            self.first_event_s = first

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "requests": self.clients,
            "tokens": self.tokens,
            "events": self.events,
            "bytes": self.bytes,
            "cost": self.cost,
        }


class Meter:
    """Tallies for every client of one run, and the observers that hear of them.

    Open clients are held one by one; a client that ends is folded into running sums
    (`ended`, and per model and per key) and its row kept for the bill only while there
    are at most `keep_rows` (None: all, for a run of one request). `clock` (for durations)
    and `wall_clock` (for the time of day a client started) are injected for tests."""

    def __init__(
        self,
        tokenizer: str = "whitespace",
        price_per_million: float | None = None,
        clock: Clock = time.monotonic,
        *,
        pricing: Pricing | None = None,
        keep_rows: int | None = MAX_BILL_ROWS,
        wall_clock: Clock = time.time,
    ) -> None:
        self.tokenizer = tokenizer
        self.pricing = pricing if pricing is not None else Pricing(price_per_million)
        self._clock = clock
        self._wall_clock = wall_clock
        self.started_at = clock()
        self.keep_rows = keep_rows
        self.invalid_utf8_bytes = 0
        self.ended = Summary(priced=self.pricing.per_million is not None)
        self.by_model: dict[str, Summary] = {}
        self.by_key: dict[str, Summary] = {}
        self.upstream_usage: Usage | None = None
        self._open: dict[int, ClientMeter] = {}
        self._rows: list[ClientBill] = []
        self._opened = 0
        self._observers: list[MeterObserver] = []
        self._on_write: tuple[OnWrite, ...] = ()
        self._first_at: float | None = None
        self._samples: deque[tuple[float, int]] = deque()

    @property
    def price_per_million(self) -> float | None:
        return self.pricing.per_million

    @property
    def clients(self) -> list[ClientMeter]:
        """The clients being served now."""
        return list(self._open.values())

    @property
    def rows_omitted(self) -> int:
        """Ended clients whose rows the bill does not list (they are in the sums)."""
        return self.ended.clients - len(self._rows)

    def now(self) -> float:
        """The meter's clock."""
        return self._clock()

    def subscribe(self, observer: MeterObserver) -> None:
        """Tell `observer` of every client opened, write recorded and client closed from now on."""
        self._observers.append(observer)
        if type(observer).wrote is not MeterObserver.wrote:
            self._on_write = (*self._on_write, observer.wrote)

    def open_client(
        self,
        peer: str = "",
        request: RequestFacts | None = None,
        *,
        request_id: str | None = None,
        key: str | None = None,
    ) -> ClientMeter:
        self._opened += 1
        client = ClientMeter(self._opened, peer, self._clock, request, self._on_write)
        client.request_id = request_id or new_request_id()
        client.key = key
        client.started_wall = self._wall_clock()
        self._open[client.id] = client
        for observer in self._observers:
            observer.opened(client)
        return client

    def close(self, client: ClientMeter, reason: str, error: str | None = None) -> ClientBill:
        """Close `client` with `reason` (the first reason wins) and tell the observers, once."""
        client.close(reason, error)
        bill = client.bill(self._clock(), self.pricing)
        first = client.first_event_at
        if first is not None and (self._first_at is None or first < self._first_at):
            self._first_at = first
        if self._open.pop(client.id, None) is not None:
            self._fold(bill)
            for observer in self._observers:
                observer.closed(bill)
        return bill

    def _fold(self, bill: ClientBill) -> None:
        self.ended.add(bill)
        if bill.request is not None:
            _group(self.by_model, bill.model or "-").add(bill)
        if bill.key is not None:
            _group(self.by_key, bill.key).add(bill)
        if bill.upstream_usage is not None:
            self.upstream_usage = sum_usage(
                [u for u in (self.upstream_usage, bill.upstream_usage) if u is not None]
            )
        if self.keep_rows is not None and self.ended.clients > self.keep_rows:
            self._rows.clear()  # past the limit the bill lists none: a partial list misleads
        else:
            self._rows.append(bill)

    def totals(self) -> Totals:
        open_clients = self._open.values()
        tokens = self.ended.tokens + sum(c.billed_tokens for c in open_clients)
        costs = [
            self.pricing.cost(c.billed_tokens, c.upstream_usage, c.model) for c in open_clients
        ]
        cost = self.ended.cost
        if any(c is not None for c in costs):
            cost = round((cost or 0.0) + sum(c for c in costs if c is not None), 10)
        now = self._clock()
        first = self._first_byte_at()
        return Totals(
            tokens=tokens,
            events=self.ended.events + sum(c.events for c in open_clients),
            bytes=self.ended.bytes + sum(c.bytes for c in open_clients),
            elapsed_s=0.0 if first is None else now - first,
            active_clients=sum(1 for c in open_clients if c.active),
            clients=self._opened,
            cost=cost,
            recent_rate=self._recent_rate(now, tokens),
        )

    def _first_byte_at(self) -> float | None:
        """When the first client got its first byte: the run is measured from there (a
        relay that waits an hour for its first client has not been streaming for an hour)."""
        firsts = [c.first_event_at for c in self._open.values() if c.first_event_at is not None]
        if self._first_at is not None:
            firsts.append(self._first_at)
        return min(firsts) if firsts else None

    def _recent_rate(self, now: float, tokens: int) -> float | None:
        """Tokens per second over the last RATE_WINDOW seconds of totals() calls (the live
        view asks several times a second); None until two samples are RATE_WINDOW apart
        or more than a second apart."""
        samples = self._samples
        samples.append((now, tokens))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        return (tokens - before) / (now - then) if now - then >= 1.0 else None

    def bill(self, reason: str) -> Bill:
        """Close the account. Clients still open are closed with `reason`."""
        if reason not in REASONS:
            raise ValueError(f"unknown bill reason {reason!r}")
        now = self._clock()
        for client in list(self._open.values()):
            self.close(client, reason)
        ended = self.ended
        first = self._first_byte_at()
        return Bill(
            reason=Reason(reason),
            tokens=ended.tokens,
            events=ended.events,
            bytes=ended.bytes,
            # From the first client's first byte, not the start: a client that connects
            # 5 s in does not make the run 5 s long, nor its tokens/s five times lower.
            duration_s=0.0 if first is None else round(now - first, 6),
            time_to_first_event_s=ended.first_event_s,
            tokenizer=self.tokenizer,
            price_per_million=self.price_per_million,
            cost=ended.cost,
            clients=tuple(sorted(self._rows, key=lambda row: row.id)),
            invalid_utf8_bytes=self.invalid_utf8_bytes,
            upstream_usage=self.upstream_usage,
            client_count=ended.clients,
            unpriced=ended.unpriced,
            reported_requests=ended.reported,
            by_model={name: group.to_dict() for name, group in self.by_model.items()},
            by_key={name: group.to_dict() for name, group in self.by_key.items()},
        )


def _group(groups: dict[str, Summary], name: str) -> Summary:
    found = groups.get(name)
    if found is None:
        if len(groups) >= MAX_GROUPS:
            name = OTHER
        found = groups.setdefault(name, Summary())
    return found
