"""Tests for the running tallies and the bill, `sserelay.metering.meter`.

Time is injected (STYLE.md, "Code": `clock=time.monotonic`), so every duration here comes from
a fake clock the test moves by hand: no sleeps. The bill's keys are DESIGN.md's "CLI contract".
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.metering.bill import Bill, RequestFacts
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.pricing import cost_of
from sserelay.metering.reason import REASONS
from sserelay.metering.usage import Usage

# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A clock that stands still until the test moves `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# DESIGN.md, "CLI contract": the documented reasons (REASONS may add more, never fewer).
DOCUMENTED_REASONS = [
    "complete",
    "client_disconnected",
    "interrupted",
    "upstream_error",
    "input_error",
]

# --------------------------------------------------------------------------- ClientMeter


def test_record_accumulates(clock: FakeClock) -> None:
    client = ClientMeter(7, "127.0.0.1:5000", clock)
    client.record(1, 3, 20)
    client.record(2, 5, 41)
    client.record(0, 0, 8)
    assert (client.id, client.peer) == (7, "127.0.0.1:5000")
    assert (client.events, client.tokens, client.bytes) == (3, 8, 69)
    assert client.active
    assert client.reason is None


def test_first_event_at_is_set_by_the_first_record_with_events_only(clock: FakeClock) -> None:
    client = ClientMeter(1, "", clock)
    assert client.opened_at == 1000.0
    clock.now = 1001.0
    client.record(0, 0, 8)  # a heartbeat: bytes but no event
    assert client.first_event_at is None
    clock.now = 1002.5
    client.record(1, 2, 16)
    assert client.first_event_at == 1002.5
    clock.now = 1009.0
    client.record(4, 4, 64)
    assert client.first_event_at == 1002.5


def test_close_first_reason_wins(clock: FakeClock) -> None:
    client = ClientMeter(1, "", clock)
    clock.now = 1004.0
    client.close("client_disconnected")
    clock.now = 1005.0
    client.close("complete")
    assert client.reason == "client_disconnected"
    assert client.closed_at == 1004.0
    assert not client.active


def test_client_bill_durations_come_from_the_clock(clock: FakeClock) -> None:
    client = ClientMeter(3, "peer", clock)
    clock.now = 1000.25
    client.record(1, 1, 10)
    clock.now = 1002.0
    client.close("complete")
    clock.now = 1100.0  # billing later does not stretch a closed client's duration
    bill = client.bill(clock.now)
    assert bill.duration_s == pytest.approx(2.0)
    assert bill.time_to_first_event_s == pytest.approx(0.25)
    assert (bill.id, bill.peer, bill.tokens, bill.events, bill.bytes, bill.reason) == (
        3,
        "peer",
        1,
        1,
        10,
        "complete",
    )


def test_client_bill_of_a_client_without_events(clock: FakeClock) -> None:
    client = ClientMeter(1, "", clock)
    clock.now = 1003.0
    bill = client.bill(clock.now)  # still open: measured up to `now`
    assert bill.duration_s == pytest.approx(3.0)
    assert bill.time_to_first_event_s is None


# --------------------------------------------------------------------------- Meter.totals


def test_totals_sum_over_clients(clock: FakeClock) -> None:
    meter = Meter(price_per_million=2.0, clock=clock)
    first, second = meter.open_client("a"), meter.open_client("b")
    assert (first.id, second.id) == (1, 2)
    first.record(2, 10, 100)
    second.record(3, 30, 300)
    second.close("client_disconnected")
    clock.now = 1004.0
    totals = meter.totals()
    assert (totals.tokens, totals.events, totals.bytes) == (40, 5, 400)
    assert (totals.active_clients, totals.clients) == (1, 2)
    assert totals.elapsed_s == pytest.approx(4.0)
    assert totals.tokens_per_s == pytest.approx(10.0)
    assert totals.cost == pytest.approx(40 * 2.0 / 1e6)


def test_totals_at_the_start(clock: FakeClock) -> None:
    totals = Meter(clock=clock).totals()
    assert (totals.tokens, totals.events, totals.bytes) == (0, 0, 0)
    assert (totals.active_clients, totals.clients) == (0, 0)
    assert totals.elapsed_s == 0.0
    assert totals.tokens_per_s == 0.0  # no division by a zero elapsed time
    assert totals.cost is None  # no price, no cost


# --------------------------------------------------------------------------- Meter.bill


def test_bill_closes_open_clients_with_its_reason(clock: FakeClock) -> None:
    meter = Meter(clock=clock)
    gone, still_open = meter.open_client(), meter.open_client()
    gone.close("client_disconnected")
    bill = meter.bill("interrupted")
    assert bill.reason == "interrupted"
    assert [client.reason for client in bill.clients] == ["client_disconnected", "interrupted"]
    assert still_open.reason == "interrupted"
    assert not still_open.active


def test_bill_totals_are_sums_over_clients(clock: FakeClock) -> None:
    meter = Meter(tokenizer="chars", clock=clock)
    clock.now = 1001.0
    first = meter.open_client("127.0.0.1:1")
    clock.now = 1003.0
    first.record(1, 5, 50)  # first event 2.0 s after it connected
    clock.now = 1004.0
    second = meter.open_client("127.0.0.1:2")
    clock.now = 1004.5
    second.record(2, 7, 70)  # first event 0.5 s after it connected
    second.record(1, 1, 10)
    clock.now = 1010.0
    bill = meter.bill("complete")
    assert (bill.tokens, bill.events, bill.bytes) == (13, 4, 130)
    assert bill.tokens == sum(client.tokens for client in bill.clients)
    assert bill.events == sum(client.events for client in bill.clients)
    assert bill.bytes == sum(client.bytes for client in bill.clients)
    assert bill.duration_s == pytest.approx(7.0)  # issue 18: from the first byte, at 1003.0
    assert bill.time_to_first_event_s == pytest.approx(0.5)  # the minimum of the clients'
    assert [c.time_to_first_event_s for c in bill.clients] == [
        pytest.approx(2.0),
        pytest.approx(0.5),
    ]
    assert [c.duration_s for c in bill.clients] == [pytest.approx(9.0), pytest.approx(6.0)]
    assert bill.tokenizer == "chars"
    assert bill.tokens_per_s == pytest.approx(13 / 7, abs=1e-3)


def test_bill_without_clients(clock: FakeClock) -> None:
    meter = Meter(price_per_million=3.0, clock=clock)
    clock.now = 1002.0
    bill = meter.bill("interrupted")
    assert (bill.tokens, bill.events, bill.bytes, bill.clients) == (0, 0, 0, ())
    assert bill.time_to_first_event_s is None
    assert bill.duration_s == 0.0  # no client got a byte: nothing was streamed
    assert bill.cost == 0.0


def test_time_to_first_event_ignores_clients_without_events(clock: FakeClock) -> None:
    meter = Meter(clock=clock)
    meter.open_client().record(0, 0, 8)  # only a heartbeat
    late = meter.open_client()
    clock.now = 1007.0
    late.record(1, 1, 10)
    assert meter.bill("complete").time_to_first_event_s == pytest.approx(7.0)


@pytest.mark.parametrize(
    ("tokens", "price", "cost"),
    [
        (1_000_000, 2.5, 2.5),
        (1500, 2.0, 0.003),
        (1234, 0.5, 0.000617),
        (0, 10.0, 0.0),
        (7, 0.0, 0.0),
        (1500, None, None),
    ],
)
def test_cost_is_tokens_times_price_per_million(
    clock: FakeClock, tokens: int, price: float | None, cost: float | None
) -> None:
    assert cost_of(tokens, price) == (None if cost is None else pytest.approx(cost))
    meter = Meter(price_per_million=price, clock=clock)
    meter.open_client().record(1, tokens, 1)
    bill = meter.bill("complete")
    assert bill.price_per_million == price
    if cost is None:
        assert bill.cost is None
        assert meter.totals().cost is None
    else:
        assert bill.cost == pytest.approx(cost)
        assert meter.totals().cost == pytest.approx(cost)


@pytest.mark.parametrize("reason", DOCUMENTED_REASONS)
def test_every_documented_reason_is_accepted(clock: FakeClock, reason: str) -> None:
    assert reason in REASONS
    assert Meter(clock=clock).bill(reason).reason == reason


@pytest.mark.parametrize("reason", ["", "done", "Complete", "client disconnected"])
def test_unknown_reason_is_a_value_error(clock: FakeClock, reason: str) -> None:
    meter = Meter(clock=clock)
    client = meter.open_client()
    with pytest.raises(ValueError, match="unknown bill reason"):
        meter.bill(reason)
    assert client.active  # a refused bill closed nothing


def test_bill_is_immutable(clock: FakeClock) -> None:
    bill = Meter(clock=clock).bill("complete")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bill.tokens = 1  # type: ignore[misc]


RECORDS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),  # which client
        st.integers(min_value=0, max_value=5),  # events
        st.integers(min_value=0, max_value=1000),  # tokens
        st.integers(min_value=0, max_value=10_000),  # bytes
    ),
    max_size=30,
)


@given(RECORDS)
def test_bill_totals_equal_the_sum_of_all_records(
    records: list[tuple[int, int, int, int]],
) -> None:
    meter = Meter(clock=FakeClock())
    clients = [meter.open_client() for _ in range(4)]
    for which, events, tokens, nbytes in records:
        clients[which].record(events, tokens, nbytes)
    bill = meter.bill("complete")
    assert bill.events == sum(record[1] for record in records)
    assert bill.tokens == sum(record[2] for record in records)
    assert bill.bytes == sum(record[3] for record in records)
    for index, client in enumerate(bill.clients):
        mine = [record for record in records if record[0] == index]
        assert client.tokens == sum(record[2] for record in mine)
    totals = meter.totals()
    assert (totals.tokens, totals.events, totals.bytes) == (bill.tokens, bill.events, bill.bytes)


# --------------------------------------------------------------------------- Bill.to_dict

BILL_KEYS = {"tokens", "events", "bytes", "duration_s", "reason", "tokenizer", "cost", "clients"}
CLIENT_KEYS = {"tokens", "events", "bytes", "reason"}


def sample_meter(clock: FakeClock, *, price: float | None = 1.5) -> Meter:
    meter = Meter(tokenizer="whitespace", price_per_million=price, clock=clock)
    first, second = meter.open_client("127.0.0.1:1"), meter.open_client("127.0.0.1:2")
    clock.now = 1000.5
    first.record(3, 9, 120)
    second.record(1, 2, 30)
    second.close("client_disconnected")
    clock.now = 1002.0
    return meter


def test_to_dict_has_the_documented_keys(clock: FakeClock) -> None:
    data = sample_meter(clock).bill("complete").to_dict()
    assert set(data) >= BILL_KEYS
    assert "upstream_usage" not in data  # only when the upstream reported one
    assert (data["tokens"], data["events"], data["bytes"]) == (11, 4, 150)
    assert data["duration_s"] == pytest.approx(1.5)  # from the first byte, at 1000.5
    assert (data["reason"], data["tokenizer"]) == ("complete", "whitespace")
    assert data["cost"] == pytest.approx(11 * 1.5 / 1e6)
    assert [set(client) >= CLIENT_KEYS for client in data["clients"]] == [True, True]
    assert [(c["tokens"], c["events"], c["bytes"], c["reason"]) for c in data["clients"]] == [
        (9, 3, 120, "complete"),
        (2, 1, 30, "client_disconnected"),
    ]


def test_to_dict_cost_is_none_without_price(clock: FakeClock) -> None:
    data = sample_meter(clock, price=None).bill("complete").to_dict()
    assert data["cost"] is None


def test_to_dict_has_upstream_usage_when_set(clock: FakeClock) -> None:
    meter = sample_meter(clock)
    request = meter.open_client("127.0.0.1:3", RequestFacts("POST", "/v1/chat/completions"))
    request.upstream_usage = Usage(12, 11, 23)
    data = meter.bill("complete").to_dict()
    usage = {"input_tokens": 12, "output_tokens": 11, "total_tokens": 23}
    assert data["upstream_usage"] == usage
    assert data["clients"][-1]["upstream_usage"] == usage


@pytest.mark.parametrize("usage", [None, {"input_tokens": 5, "output_tokens": 9}])
@pytest.mark.parametrize("price", [None, 0.25])
def test_to_dict_round_trips_through_json(
    clock: FakeClock, usage: dict[str, int] | None, price: float | None
) -> None:
    meter = sample_meter(clock, price=price)
    if usage is not None:
        request = meter.open_client("127.0.0.1:3", RequestFacts("POST", "/v1/messages"))
        request.upstream_usage = Usage(usage["input_tokens"], usage["output_tokens"])
    meter.invalid_utf8_bytes = 3
    bill: Bill = meter.bill("interrupted")
    data = bill.to_dict()
    assert json.loads(json.dumps(data)) == data
