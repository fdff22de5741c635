"""Live figures per key and model, for `/metrics`, `/usage` and the dashboard (pure).

The Meter sums what ended per model and per key apart; an operator wants them together (this
key's tokens of that model), the requests by how they ended, latencies as histograms, and what
is streaming right now. `Tally` keeps those sums from the meter's observer hook — `closed()`
only: it adds nothing to the per-event path — and `view()` adds the clients still open at the
moment someone looks (a scrape, a dashboard tick), so a long stream shows as it grows.

Two rules make the figures safe to expose:

- **Bounded labels.** A model name becomes a label only once a request for it was answered
  (it got metered tokens, or a status below 400), only the first `max_models` such names, and
  never one longer than MAX_LABEL characters; every other name is summed as `other`. A client
  that names 10,000 models, or models the upstream refuses, cannot grow the series count. Keys
  are bounded by the keys file; past `max_keys` they are summed as `other` too.
- **Counters never go back.** What a view showed of an open client under some labels stays
  there: if the client's labels change later (the upstream names the model it answered with),
  only the rest of its figures go to the new labels. So every series only grows, and the sums
  over all series still equal the bill's. (A cost can shrink if the model's price does when
  the upstream names another model; the larger figure then stands.)
"""

from __future__ import annotations

from collections import deque

from sserelay.metering.bill import ClientBill
from sserelay.metering.figures import (
    Figures,
    Group,
    Histogram,
    RecentRequest,
    View,
    add_cost,
    add_count,
)
from sserelay.metering.meter import OTHER, ClientMeter, Meter, MeterObserver
from sserelay.metering.usage import Usage

#: Distinct model names summed apart in the live figures (the rest are `other`).
MAX_MODEL_LABELS = 100
#: Distinct key names summed apart (a keys file bounds them already).
MAX_KEY_LABELS = 1000
#: A model (or key) name longer than this is never a label of its own.
MAX_LABEL = 100
#: Requests kept for the dashboard's table of recent requests.
RECENT = 50

#: Histogram bounds, in seconds. Time to first token: a local mock answers in a millisecond,
#: a loaded model in tens of seconds.
TTFT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Stream duration: a completion takes seconds, a broadcast stream may last hours.
DURATION_BOUNDS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
#: How long the proxy took to close the upstream after a client left: well under 1 ms is
#: the design goal, so the buckets are fine at the low end.
CLOSE_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class _Sums:
    """A group's running sums (mutable; a view copies them)."""

    __slots__ = ("bytes", "cached", "cost", "events", "input", "output", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.events = 0
        self.bytes = 0
        self.cost: float | None = None
        self.input: int | None = None
        self.output: int | None = None
        self.cached: int | None = None

    def add(self, part: _Part) -> None:
        self.tokens += part[0]
        self.events += part[1]
        self.bytes += part[2]
        self.cost = add_cost(self.cost, part[3])

    def add_usage(self, usage: Usage | None) -> None:
        if usage is None:
            return
        self.input = add_count(self.input, usage.input_tokens)
        self.output = add_count(self.output, usage.output_tokens)
        self.cached = add_count(self.cached, getattr(usage, "cached_tokens", None))

    def figures(self, extra: _Part | None = None) -> Figures:
        tokens, events, nbytes, cost = self.tokens, self.events, self.bytes, self.cost
        if extra is not None:
            tokens += extra[0]
            events += extra[1]
            nbytes += extra[2]
            cost = add_cost(cost, extra[3])
        return Figures(tokens, events, nbytes, cost, self.input, self.output, self.cached)


#: (tokens, events, bytes, cost) of one client, or the part of it shown under some labels.
_Part = tuple[int, int, int, "float | None"]
_NOTHING: _Part = (0, 0, 0, None)


def _minus(a: _Part, b: _Part) -> _Part:
    cost = None if a[3] is None else a[3] - (b[3] or 0.0)
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2], cost)


def _plus(a: _Part, b: _Part) -> _Part:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2], add_cost(a[3], b[3]))


def _at_least(a: _Part, floor: _Part) -> _Part:
    """`a`, raised field by field to `floor` (what was shown stays shown)."""
    cost = a[3]
    if floor[3] is not None and (cost is None or cost < floor[3]):
        cost = floor[3]
    return (max(a[0], floor[0]), max(a[1], floor[1]), max(a[2], floor[2]), cost)


class _Shown:
    """What views have shown of one open client: under which labels, how much, and how much
    stays with labels it had before."""

    __slots__ = ("answered", "carried", "group", "key", "model", "part", "ttft_seen")

    def __init__(self, group: Group, client: ClientMeter, answered: bool) -> None:
        self.group = group
        self.part: _Part = _NOTHING
        self.carried: _Part = _NOTHING
        self.ttft_seen = False
        # What the labels were made from: the same objects again need no new labels.
        self.key = client.key
        self.model = client.model
        self.answered = answered


class Tally(MeterObserver):
    """Live sums per key and model over `meter`'s clients; subscribe it to the meter
    (`meter.subscribe(tally)`). `view()` is the one way to read it."""

    def __init__(
        self,
        meter: Meter,
        *,
        max_models: int = MAX_MODEL_LABELS,
        max_keys: int = MAX_KEY_LABELS,
        recent: int = RECENT,
    ) -> None:
        self.meter = meter
        self.max_models = max_models
        self.max_keys = max_keys
        self._models: set[str] = set()
        self._keys: set[str] = set()
        self._sums: dict[Group, _Sums] = {}
        self._requests: dict[tuple[Group, str, str], int] = {}
        self._ttft: dict[Group, Histogram] = {}
        self._duration: dict[Group, Histogram] = {}
        self._close = Histogram(CLOSE_BOUNDS)
        self._shown: dict[int, _Shown] = {}
        self._recent: deque[RecentRequest] = deque(maxlen=recent)
        self._served = 0
        self._per_request = False

    # ------------------------------------------------------------------ labels

    def key_label(self, key: str | None) -> str:
        if key is None:
            return ""
        if key in self._keys:
            return key
        if len(self._keys) < self.max_keys and len(key) <= MAX_LABEL:
            self._keys.add(key)
            return key
        return OTHER

    def model_label(self, model: str | None, *, answered: bool) -> str:
        """The label of `model`: its own once a request for it was `answered` and while there
        is room, else `other` ("" for no model)."""
        if not model:
            return ""
        if model in self._models:
            return model
        if answered and len(self._models) < self.max_models and len(model) <= MAX_LABEL:
            self._models.add(model)
            return model
        return OTHER

    @property
    def served(self) -> int:
        """Clients (or requests) that have ended."""
        return self._served

    def by_reason(self) -> dict[str, int]:
        """Ended clients per reason (cheap: no open client is looked at)."""
        out: dict[str, int] = {}
        for (_, reason, _), count in self._requests.items():
            out[reason] = out.get(reason, 0) + count
        return out

    @property
    def keys(self) -> list[str]:
        """The key names seen so far (bounded), sorted."""
        return sorted(self._keys)

    def _group_of_open(self, client: ClientMeter) -> Group:
        request = client.request
        answered = client.tokens > 0 or (
            request is not None and request.status is not None and request.status < 400
        )
        return Group(self.key_label(client.key), self.model_label(client.model, answered=answered))

    def _group_of_bill(self, bill: ClientBill) -> Group:
        request = bill.request
        answered = bill.tokens > 0 or (
            request is not None and request.status is not None and request.status < 400
        )
        return Group(self.key_label(bill.key), self.model_label(bill.model, answered=answered))

    # ------------------------------------------------------------------ the observer hook

    def closed(self, bill: ClientBill) -> None:
        group = self._group_of_bill(bill)
        final: _Part = (bill.tokens, bill.events, bill.bytes, bill.cost)
        shown = self._shown.pop(bill.id, None)
        if shown is None:
            part = final
        else:
            if shown.group != group:
                self._move(shown, group)
            part = _at_least(_minus(final, shown.carried), shown.part)
        sums = self._sums_of(group)
        sums.add(part)
        sums.add_usage(bill.upstream_usage)
        if bill.request is not None:
            self._per_request = True
        status = _status_label(bill)
        slot = (group, str(bill.reason), status)
        self._requests[slot] = self._requests.get(slot, 0) + 1
        if bill.time_to_first_event_s is not None and not (shown and shown.ttft_seen):
            self._histogram(self._ttft, group, TTFT_BOUNDS).observe(bill.time_to_first_event_s)
        self._histogram(self._duration, group, DURATION_BOUNDS).observe(bill.duration_s)
        self._served += 1
        self._recent.append(_recent(bill))

    def upstream_closed(self, seconds: float) -> None:
        """The proxy closed an upstream response `seconds` after learning its client left."""
        self._close.observe(seconds)

    # ------------------------------------------------------------------ reading

    def view(self) -> View:
        """The figures now: ended clients' sums plus the open clients' figures so far."""
        extra: dict[Group, _Part] = {}
        active: dict[Group, int] = {}
        cost_of = self.meter.pricing.cost
        priced = self.meter.pricing.per_million is not None or self.meter.pricing.models
        shown_of = self._shown
        # Once a second for the dashboard, and at each scrape, over every open client: the
        # common case (labels as before, nothing carried) is a few additions per client.
        for client in self.meter.clients:
            shown = shown_of.get(client.id)
            if (
                shown is None
                or shown.key is not client.key
                or shown.model is not client.model
                or not shown.answered
            ):
                shown = self._relabel(client, shown)
            group = shown.group
            cost = cost_of(client.tokens, client.upstream_usage, client.model) if priced else None
            now: _Part = (client.tokens, client.events, client.bytes, cost)
            if shown.carried is not _NOTHING:
                now = _at_least(_minus(now, shown.carried), shown.part)
            shown.part = now
            found = extra.get(group)
            extra[group] = now if found is None else _plus(found, now)
            if client.active:
                active[group] = active.get(group, 0) + 1
            if not shown.ttft_seen and client.first_event_at is not None:
                shown.ttft_seen = True
                first = client.first_event_at - client.opened_at
                self._histogram(self._ttft, group, TTFT_BOUNDS).observe(first)
        groups = {group: sums.figures(extra.pop(group, None)) for group, sums in self._sums.items()}
        for group, part in extra.items():
            groups[group] = _Sums().figures(part)
        return View(
            totals=self.meter.totals(),
            groups=dict(sorted(groups.items())),
            requests=dict(self._requests),
            active=active,
            ttft={group: h.view() for group, h in self._ttft.items()},
            duration={group: h.view() for group, h in self._duration.items()},
            close_after_disconnect=self._close.view(),
            served=self._served,
            per_request=self._per_request,
            recent=tuple(self._recent),
        )

    # ------------------------------------------------------------------ inside

    def _relabel(self, client: ClientMeter, shown: _Shown | None) -> _Shown:
        """The labels of an open client, made anew; what was shown under others stays there."""
        if client.request is not None:
            self._per_request = True
        request = client.request
        answered = client.tokens > 0 or (
            request is not None and request.status is not None and request.status < 400
        )
        group = self._group_of_open(client)
        if shown is None:
            shown = self._shown[client.id] = _Shown(group, client, answered)
        elif shown.group != group:
            self._move(shown, group)
        shown.key, shown.model, shown.answered = client.key, client.model, answered
        return shown

    def _move(self, shown: _Shown, group: Group) -> None:
        """An open client's labels changed: what was shown under the old ones stays there."""
        self._sums_of(shown.group).add(shown.part)
        shown.carried = _plus(shown.carried, shown.part)
        shown.part = _NOTHING
        shown.group = group

    def _sums_of(self, group: Group) -> _Sums:
        sums = self._sums.get(group)
        if sums is None:
            sums = self._sums[group] = _Sums()
        return sums

    @staticmethod
    def _histogram(
        histograms: dict[Group, Histogram], group: Group, bounds: tuple[float, ...]
    ) -> Histogram:
        found = histograms.get(group)
        if found is None:
            found = histograms[group] = Histogram(bounds)
        return found


def _status_label(bill: ClientBill) -> str:
    """The status label: the upstream's (or the answer's) HTTP status; 200 for a `serve`
    client (as the ledger has it); "" when none is known (the request failed before an
    answer); `other` for a number no HTTP status is."""
    if bill.request is None:
        return "200"
    status = bill.request.status
    if status is None:
        return ""
    return str(status) if 100 <= status <= 599 else OTHER


def _recent(bill: ClientBill) -> RecentRequest:
    model = bill.model
    if model is not None and len(model) > 200:
        model = model[:199] + "…"
    return RecentRequest(
        request_id=bill.request_id,
        ended_wall=bill.started_wall + bill.duration_s,
        key=bill.key,
        model=model,
        status=None if bill.request is None else bill.request.status,
        tokens=bill.tokens,
        events=bill.events,
        cost=bill.cost,
        duration_s=bill.duration_s,
        time_to_first_event_s=bill.time_to_first_event_s,
        reason=str(bill.reason),
    )
