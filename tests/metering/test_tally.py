"""The live figures per key and model, `sserelay.metering.tally` (pure: a fake clock, no I/O)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.metering.bill import RequestFacts
from sserelay.metering.figures import Figures, Group, Histogram, View, total_figures
from sserelay.metering.meter import ClientMeter, Meter, MeterObserver
from sserelay.metering.pricing import Pricing
from sserelay.metering.tally import CLOSE_BOUNDS, Tally
from sserelay.metering.usage import Usage


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tallied(price: float | None = None) -> tuple[Meter, Tally, FakeClock]:
    clock = FakeClock()
    meter = Meter(pricing=Pricing(price), clock=clock, wall_clock=lambda: 1_700_000_000.0)
    tally = Tally(meter)
    meter.subscribe(tally)
    return meter, tally, clock


def request(model: str | None = "gpt-4o", status: int | None = 200) -> RequestFacts:
    return RequestFacts("POST", "/v1/chat/completions", model, status)


def test_ended_requests_are_summed_per_key_and_model_and_counted_by_reason_and_status() -> None:
    meter, tally, clock = tallied(price=2.0)
    for key, model, tokens, reason in [
        ("alice", "gpt-4o", 10, "complete"),
        ("alice", "gpt-4o", 5, "client_disconnected"),
        ("bob", "gpt-4o", 7, "complete"),
        ("alice", "claude", 3, "complete"),
    ]:
        client = meter.open_client("peer", request(model), key=key)
        clock.now += 0.02
        client.record(1, tokens, 10 * tokens)
        clock.now += 1.0
        meter.close(client, reason)
    view = tally.view()
    assert view.groups[Group("alice", "gpt-4o")] == Figures(15, 2, 150, 15 * 2.0 / 1e6)
    assert view.groups[Group("bob", "gpt-4o")].tokens == 7
    assert view.requests[(Group("alice", "gpt-4o"), "complete", "200")] == 1
    assert view.requests[(Group("alice", "gpt-4o"), "client_disconnected", "200")] == 1
    assert view.by_reason() == {"complete": 3, "client_disconnected": 1}
    by_key = view.by_key()
    assert (by_key["alice"].requests, by_key["alice"].tokens) == (3, 18)
    assert view.by_model()["gpt-4o"].tokens == 22
    ttft = view.ttft[Group("alice", "gpt-4o")]
    assert ttft.count == 2 and ttft.sum > 0.039
    assert view.duration[Group("bob", "gpt-4o")].count == 1

    bill = meter.bill("complete")
    total = total_figures(view.groups.values())
    assert (total.tokens, total.events, total.bytes) == (bill.tokens, bill.events, bill.bytes)
    assert total.cost == bill.cost
    assert view.served == 4 and view.totals.tokens == bill.tokens


def test_open_clients_are_in_the_view_as_they_grow() -> None:
    meter, tally, _ = tallied()
    client = meter.open_client("peer")  # a `serve` client: no key, no model
    client.record(2, 6, 40)
    view = tally.view()
    assert view.groups == {Group("", ""): Figures(6, 2, 40)}
    assert view.active == {Group("", ""): 1} and view.clients == 1
    assert view.by_model() == {} and view.by_key() == {}
    client.record(1, 3, 20)
    assert tally.view().groups[Group("", "")].tokens == 9
    meter.close(client, "complete")
    view = tally.view()
    assert view.groups == {Group("", ""): Figures(9, 3, 60)}
    assert view.active == {} and view.requests == {(Group("", ""), "complete", "200"): 1}
    assert view.ttft[Group("", "")].count == 1  # seen while open, not counted again at close


def test_what_a_view_showed_stays_under_its_labels_when_the_model_changes() -> None:
    meter, tally, _ = tallied(price=1.0)
    client = meter.open_client("peer", request("gpt-4o", None), key="alice")
    client.record(1, 4, 10)
    first = tally.view()
    assert first.groups[Group("alice", "gpt-4o")].tokens == 4
    # The upstream names the snapshot that answered: the rest goes to the new label.
    client.update_request(model="gpt-4o-2024-08-06", status=200)
    client.record(1, 6, 10)
    second = tally.view()
    assert second.groups[Group("alice", "gpt-4o")].tokens == 4
    assert second.groups[Group("alice", "gpt-4o-2024-08-06")].tokens == 6
    meter.close(client, "complete")
    third = tally.view()
    assert third.groups[Group("alice", "gpt-4o")].tokens == 4
    assert third.groups[Group("alice", "gpt-4o-2024-08-06")].tokens == 6
    assert total_figures(third.groups.values()).tokens == meter.bill("complete").tokens


def test_ten_thousand_model_names_keep_the_labels_bounded() -> None:
    meter, tally, _ = tallied()
    tally.max_models = 20
    for i in range(10_000):
        client = meter.open_client("peer", request(f"model-{i}"), key="k")
        client.record(1, 1, 1)
        meter.close(client, "complete")
    view = tally.view()
    models = {group.model for group in view.groups}
    assert len(models) == 21 and "other" in models
    assert sum(f.tokens for f in view.groups.values()) == 10_000
    assert len(view.requests) == 21 and len(view.ttft) == 21 and len(view.duration) == 21


def test_a_model_the_upstream_refused_never_becomes_a_label() -> None:
    meter, tally, _ = tallied()
    for i in range(50):
        client = meter.open_client("peer", request(f"junk-{i}", 404))
        meter.close(client, "upstream_error")
    long_name = "x" * 500
    client = meter.open_client("peer", request(long_name))
    client.record(1, 1, 1)
    meter.close(client, "complete")
    client = meter.open_client("peer", request("real"))
    client.record(1, 2, 2)
    meter.close(client, "complete")
    view = tally.view()
    assert {group.model for group in view.groups} == {"other", "real"}
    assert view.requests[(Group("", "other"), "upstream_error", "404")] == 50
    # The dashboard's table keeps a request's own model name (cut short), not the label.
    assert view.recent[-2].model is not None and len(view.recent[-2].model) == 200


def test_reported_usage_is_summed_none_aware() -> None:
    meter, tally, _ = tallied()
    for usage in [Usage(10, 3, 13), Usage(None, 4, None), None]:
        client = meter.open_client("peer", request())
        client.upstream_usage = usage
        meter.close(client, "complete")
    figures = tally.view().groups[Group("", "gpt-4o")]
    assert (figures.input_tokens, figures.output_tokens, figures.cached_tokens) == (10, 7, None)


def test_status_labels() -> None:
    meter, tally, _ = tallied()
    for status in [None, 200, 999]:
        meter.close(meter.open_client("p", request("m", status)), "upstream_error")
    labels = {status for (_, _, status) in tally.view().requests}
    assert labels == {"", "200", "other"}


def test_the_recent_requests_are_the_last_ones() -> None:
    meter, tally, _ = tallied()
    for i in range(60):
        client = meter.open_client("p", request(), request_id=f"req_{i}")
        meter.close(client, "complete")
    recent = tally.view().recent
    assert len(recent) == 50 and recent[-1].request_id == "req_59"
    assert recent[-1].to_dict()["reason"] == "complete"


def test_a_histogram_counts_a_value_on_its_bound_in_that_bucket() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    view = histogram.view()
    assert view.buckets == ((0.1, 1), (1.0, 3), (float("inf"), 4))
    assert (view.count, view.sum) == (4, 8.6)


def test_upstream_close_times_go_to_their_histogram() -> None:
    _, tally, _ = tallied()
    tally.upstream_closed(0.0002)
    view = tally.view().close_after_disconnect
    assert view.count == 1 and view.buckets[1] == (CLOSE_BOUNDS[1], 1)


# --------------------------------------------------------------------------- property

steps = st.lists(
    st.tuples(
        st.sampled_from(["open", "write", "rename", "view", "close"]),
        st.integers(0, 3),  # which open client
        st.integers(0, 50),  # tokens
        st.sampled_from(["m1", "m2", "m3", None]),
        st.sampled_from([None, 200, 404]),
    ),
    max_size=60,
)


def series(view: View) -> dict[tuple[Group, str], float]:
    out: dict[tuple[Group, str], float] = {}
    for group, figures in view.groups.items():
        for name in ("tokens", "events", "bytes", "cost"):
            value = getattr(figures, name)
            if value is not None:
                out[group, name] = value
    return out


@settings(max_examples=150, deadline=None)
@given(steps)
def test_every_series_only_grows_and_the_sums_equal_the_bill(
    plan: list[tuple[str, int, int, str | None, int | None]],
) -> None:
    meter, tally, clock = tallied(price=3.0)
    tally.max_models = 2  # so that `other` comes into play
    open_clients: list[ClientMeter] = []
    last: dict[tuple[Group, str], float] = {}

    def look() -> None:
        nonlocal last
        now = series(tally.view())
        for name, value in last.items():
            assert now.get(name, 0) >= value - 1e-9, (name, value, now.get(name))
        last = now

    for action, which, tokens, model, status in plan:
        clock.now += 0.01
        if action == "open" or not open_clients:
            open_clients.append(meter.open_client("p", request(model, status), key="k"))
            continue
        client = open_clients[which % len(open_clients)]
        if action == "write":
            client.record(1, tokens, tokens + 1)
        elif action == "rename":
            client.update_request(model=model or "m1", status=status)
        elif action == "view":
            look()
        else:
            meter.close(client, "complete")
            open_clients.remove(client)
        look()
    bill = meter.bill("interrupted")
    look()
    total = total_figures(tally.view().groups.values())
    assert (total.tokens, total.events, total.bytes) == (bill.tokens, bill.events, bill.bytes)
    assert sum(tally.view().requests.values()) == bill.client_count


def test_the_tally_is_not_on_the_per_event_path() -> None:
    meter, tally, _ = tallied()
    # Only observers that override `wrote` are called per write (meter.py): not this one.
    assert type(tally).wrote is MeterObserver.wrote
    client = meter.open_client("p")
    assert client._on_write == ()
