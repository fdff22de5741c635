"""`/metrics`: the run's live figures in the Prometheus text format, rendered by prometheus-client.

Nothing is counted here: `RunCollector` reads a `Tally` view (the meter's running sums plus the
open clients) when Prometheus scrapes, so the per-event path pays nothing for metrics. Each
run has its own `CollectorRegistry`: two runs in one process never share a series.

    sserelay_tokens_total{key, model, kind, source}    kind: output|input|cached;
                                                       source: metered|reported
    sserelay_cost_total{key, model}                    the bill's cost (priced requests only)
    sserelay_requests_total{key, model, reason, status}
    sserelay_events_total{key, model}, sserelay_bytes_total{key, model}
    sserelay_active_streams{key}, sserelay_clients     open now
    sserelay_time_to_first_token_seconds{key, model}   histogram
    sserelay_stream_duration_seconds{key, model}       histogram
    sserelay_upstream_close_after_disconnect_seconds   histogram (proxy)
    sserelay_budget_remaining{key}, sserelay_budget_remaining_cost{key}   with budgets

"" is a label's value where it does not apply (no key, no model: a `serve` client).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from sserelay import __version__
from sserelay.metering.budget import KeyStatus
from sserelay.metering.figures import HistogramView, View
from sserelay.metering.tally import Tally

#: What a run's budgets say about each key, for `sserelay_budget_remaining` (issue 14 wires
#: `Budgets.status`); called at each scrape with the time (Unix seconds).
BudgetStatus = Callable[[float], Iterable[KeyStatus]]


class RunCollector:
    """A prometheus-client collector over one run's `Tally` (and budgets, once there are)."""

    def __init__(
        self,
        tally: Tally,
        *,
        mode: str,
        tokenizer: str,
        budgets: BudgetStatus | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.tally = tally
        self.mode = mode
        self.tokenizer = tokenizer
        self.budgets = budgets
        self._wall_clock = wall_clock

    def collect(self) -> Iterator[Metric]:
        view = self.tally.view()
        yield from _usage(view)
        yield from _live(view)
        yield from _latencies(view)
        if self.budgets is not None:
            yield from _budgets(self.budgets(self._wall_clock()))
        info = GaugeMetricFamily(
            "sserelay_info", "This sserelay: its version, command and tokenizer.",
            labels=["version", "mode", "tokenizer"],
        )  # fmt: skip
        info.add_metric([__version__, self.mode, self.tokenizer], 1)
        yield info


def _usage(view: View) -> Iterator[Metric]:
    tokens = CounterMetricFamily(
        "sserelay_tokens",
        "Tokens: metered (written to clients, as billed) or reported by the upstream. "
        "OpenTelemetry: gen_ai.usage.output_tokens / input_tokens.",
        labels=["key", "model", "kind", "source"],
    )
    cost = CounterMetricFamily(
        "sserelay_cost", "Cost of the tokens, as the bill prices them.", labels=["key", "model"]
    )
    events = CounterMetricFamily(
        "sserelay_events", "SSE events (or chunks) written to clients.", labels=["key", "model"]
    )
    nbytes = CounterMetricFamily(
        "sserelay_bytes", "Bytes of answers written to clients.", labels=["key", "model"]
    )
    for group, figures in view.groups.items():
        labels = [group.key, group.model]
        tokens.add_metric([*labels, "output", "metered"], figures.tokens)
        for kind, reported in (
            ("input", figures.input_tokens),
            ("output", figures.output_tokens),
            ("cached", figures.cached_tokens),
        ):
            if reported is not None:
                tokens.add_metric([*labels, kind, "reported"], reported)
        if figures.cost is not None:
            cost.add_metric(labels, figures.cost)
        events.add_metric(labels, figures.events)
        nbytes.add_metric(labels, figures.bytes)
    requests = CounterMetricFamily(
        "sserelay_requests",
        "Clients (serve) or requests that ended, by how they ended and the HTTP status.",
        labels=["key", "model", "reason", "status"],
    )
    for (group, reason, status), count in view.requests.items():
        requests.add_metric([group.key, group.model, reason, status], count)
    yield from (tokens, cost, requests, events, nbytes)


def _live(view: View) -> Iterator[Metric]:
    active = GaugeMetricFamily(
        "sserelay_active_streams", "Streams being written to clients now.", labels=["key"]
    )
    per_key: dict[str, int] = {}
    for group, count in view.active.items():
        per_key[group.key] = per_key.get(group.key, 0) + count
    for key, count in sorted(per_key.items()):
        active.add_metric([key], count)
    yield active
    yield GaugeMetricFamily("sserelay_clients", "Clients connected now.", value=view.clients)


def _latencies(view: View) -> Iterator[Metric]:
    first = HistogramMetricFamily(
        "sserelay_time_to_first_token_seconds",
        "From the request (or connection) to its first event written. "
        "OpenTelemetry: gen_ai.server.time_to_first_token.",
        labels=["key", "model"],
    )
    for group, histogram in view.ttft.items():
        first.add_metric([group.key, group.model], *_buckets(histogram))
    duration = HistogramMetricFamily(
        "sserelay_stream_duration_seconds",
        "From the request (or connection) to the end of its answer. "
        "OpenTelemetry: gen_ai.server.request.duration.",
        labels=["key", "model"],
    )
    for group, histogram in view.duration.items():
        duration.add_metric([group.key, group.model], *_buckets(histogram))
    close = HistogramMetricFamily(
        "sserelay_upstream_close_after_disconnect_seconds",
        "From learning that a client left to its upstream response closed (proxy).",
    )
    close.add_metric([], *_buckets(view.close_after_disconnect))
    yield from (first, duration, close)


def _buckets(histogram: HistogramView) -> tuple[list[tuple[str, float]], float]:
    return [(_le(bound), count) for bound, count in histogram.buckets], histogram.sum


def _le(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it (`+Inf`, `0.25`, `1.0`)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _budgets(statuses: Iterable[KeyStatus]) -> Iterator[Metric]:
    tokens = GaugeMetricFamily(
        "sserelay_budget_remaining",
        "Tokens a key may still spend this period (keys with a token budget).",
        labels=["key"],
    )
    cost = GaugeMetricFamily(
        "sserelay_budget_remaining_cost",
        "Cost a key may still spend this period (keys with a cost budget).",
        labels=["key"],
    )
    for status in statuses:
        if status.remaining_tokens is not None:
            tokens.add_metric([status.name], status.remaining_tokens)
        if status.remaining_cost is not None:
            cost.add_metric([status.name], status.remaining_cost)
    yield from (tokens, cost)


def new_registry(collector: RunCollector, *, process: bool = True) -> CollectorRegistry:
    """A registry of the run's own (no global state), with the process's CPU, memory and
    file descriptors unless `process` is false."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape's body and content type: the Prometheus text format, or OpenMetrics when
    the scraper's `Accept` asks for it."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
