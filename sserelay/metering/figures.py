"""The live figures' value types: a series' labels and sums, histograms, recent requests, and
the `View` that `/metrics`, `/usage` and the dashboard read (pure; `Tally` fills them).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from sserelay.metering.bill import Totals

__all__ = [
    "Figures",
    "Group",
    "GroupSums",
    "Histogram",
    "HistogramView",
    "RecentRequest",
    "View",
    "add_cost",
    "add_count",
    "total_figures",
]


class Group(NamedTuple):
    """The labels of a series: a key and a model, "" where there is none (a `serve`
    client has no model; a run without keys has no key), `other` past the bounds. (A tuple:
    hashed and compared in C, for views over thousands of open clients.)"""

    key: str
    model: str


@dataclass(frozen=True, slots=True)
class Figures:
    """One group's sums: what its clients were written (metered), what they cost (None:
    nothing priced), and what the upstream reported (None: never reported)."""

    tokens: int = 0
    events: int = 0
    bytes: int = 0
    cost: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class HistogramView:
    """A histogram at one moment: cumulative counts per upper bound (the last is +Inf),
    the sum and the count of what was observed."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


class Histogram:
    """Counts of observations per bucket (`le` semantics: a value equal to a bound is in it)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        at = bisect_left(self.bounds, value)
        if at < len(self.counts):
            self.counts[at] += 1
        self.sum += value
        self.count += 1

    def view(self) -> HistogramView:
        running = 0
        buckets = []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        buckets.append((float("inf"), self.count))
        return HistogramView(tuple(buckets), self.sum, self.count)


@dataclass(frozen=True, slots=True)
class RecentRequest:
    """A row of the dashboard's table: one client or request that ended."""

    request_id: str
    #: when it ended, as a time of day (Unix seconds)
    ended_wall: float
    key: str | None
    model: str | None
    status: int | None
    tokens: int
    events: int
    cost: float | None
    duration_s: float
    time_to_first_event_s: float | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.request_id,
            "ended": round(self.ended_wall, 3),
            "key": self.key,
            "model": self.model,
            "status": self.status,
            "tokens": self.tokens,
            "events": self.events,
            "cost": self.cost,
            "duration_s": self.duration_s,
            "time_to_first_event_s": self.time_to_first_event_s,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class GroupSums:
    """A key's or a model's sums in a view: its requests (ended), the ones open now, and
    its figures (ended and open together)."""

    requests: int
    active: int
    tokens: int
    events: int
    bytes: int
    cost: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "active": self.active,
            "tokens": self.tokens,
            "events": self.events,
            "bytes": self.bytes,
            "cost": self.cost,
        }


@dataclass(frozen=True, slots=True)
class View:
    """Every live figure at one moment: ended clients and open ones together."""

    totals: Totals
    #: figures per (key, model)
    groups: dict[Group, Figures]
    #: ended clients per (key, model), reason and status ("" when none is known)
    requests: dict[tuple[Group, str, str], int]
    #: clients streaming now, per (key, model)
    active: dict[Group, int]
    ttft: dict[Group, HistogramView]
    duration: dict[Group, HistogramView]
    close_after_disconnect: HistogramView
    #: clients (or requests) that have ended
    served: int
    #: requests that were asked for a model (proxy, serve --as): per-model sums apply
    per_request: bool = False
    recent: tuple[RecentRequest, ...] = field(default=())

    def by_reason(self) -> dict[str, int]:
        """Ended clients per reason."""
        out: dict[str, int] = {}
        for (_, reason, _), count in self.requests.items():
            out[reason] = out.get(reason, 0) + count
        return out

    @property
    def clients(self) -> int:
        """Clients streaming now."""
        return sum(self.active.values())

    def by_key(self) -> dict[str, GroupSums]:
        """Sums per key name, over the clients that presented one."""
        return self._sums(lambda group: group.key or None)

    def by_model(self) -> dict[str, GroupSums]:
        """Sums per model (`-` for a request that named none), over requests only."""
        if not self.per_request:
            return {}
        return self._sums(lambda group: group.model or "-")

    def _sums(self, name_of: Callable[[Group], str | None]) -> dict[str, GroupSums]:
        acc: dict[str, _GroupAcc] = {}
        for group, figures in self.groups.items():
            name = name_of(group)
            if name is not None:
                acc.setdefault(name, _GroupAcc()).add(figures)
        for (group, _, _), count in self.requests.items():
            name = name_of(group)
            if name is not None:
                acc.setdefault(name, _GroupAcc()).requests += count
        for group, count in self.active.items():
            name = name_of(group)
            if name is not None:
                acc.setdefault(name, _GroupAcc()).active += count
        return {name: found.sums() for name, found in sorted(acc.items())}


class _GroupAcc:
    __slots__ = ("active", "bytes", "cost", "events", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = self.active = self.tokens = self.events = self.bytes = 0
        self.cost: float | None = None

    def add(self, figures: Figures) -> None:
        self.tokens += figures.tokens
        self.events += figures.events
        self.bytes += figures.bytes
        self.cost = add_cost(self.cost, figures.cost)

    def sums(self) -> GroupSums:
        return GroupSums(
            self.requests, self.active, self.tokens, self.events, self.bytes, self.cost
        )


def add_cost(total: float | None, cost: float | None) -> float | None:
    if cost is None:
        return total
    return round((total or 0.0) + cost, 10)


def add_count(total: int | None, count: int | None) -> int | None:
    if count is None:
        return total
    return (total or 0) + count


def total_figures(groups: Iterable[Figures]) -> Figures:
    """The sum of several groups' figures."""
    tokens = events = nbytes = 0
    cost: float | None = None
    inputs: int | None = None
    outputs: int | None = None
    cached: int | None = None
    for figures in groups:
        tokens += figures.tokens
        events += figures.events
        nbytes += figures.bytes
        cost = add_cost(cost, figures.cost)
        inputs = add_count(inputs, figures.input_tokens)
        outputs = add_count(outputs, figures.output_tokens)
        cached = add_count(cached, figures.cached_tokens)
    return Figures(tokens, events, nbytes, cost, inputs, outputs, cached)
