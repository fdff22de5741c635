"""What a person sees on stderr and stdout, `sserelay.cli.display` (pure: no terminal)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len

from sserelay.cli.display import (
    SEPARATOR,
    format_bill,
    format_in_flight,
    format_live_line,
    format_totals,
)
from sserelay.metering.bill import RequestFacts, Totals
from sserelay.metering.meter import Meter
from sserelay.metering.usage import Usage


def totals(**figures: float | int | None) -> Totals:
    base: dict[str, float | int | None] = {
        "tokens": 1234,
        "events": 45,
        "bytes": 3500,
        "elapsed_s": 12.3,
        "active_clients": 2,
        "clients": 5,
        "cost": 0.0012,
    }
    return Totals(**{**base, **figures})  # type: ignore[arg-type]


def test_every_figure_is_labelled() -> None:
    assert format_totals(totals()) == (
        "tokens 1,234 · 100.3 tok/s · clients 2 connected / 5 served · cost 0.0012 · "
        "events 45 · 3.4 KiB · 12.3 s"
    )
    assert "cost" not in format_totals(totals(cost=None))


@pytest.mark.parametrize(
    ("width", "line"),
    [
        (120, "sserelay: tokens 1,234 · 100.3 tok/s · clients 2 connected / 5 served · "
         "cost 0.0012 · events 45 · 3.4 KiB · 12.3 s"),
        (80, "tokens 1,234 · 100.3 tok/s · clients 2 connected / 5 served · cost 0.0012"),
        (60, "tokens 1,234 · clients 2 connected / 5 served · cost 0.0012"),
        (45, "tokens 1,234 · clients 2/5 · cost 0.0012"),
    ],
)  # fmt: skip
def test_a_narrow_line_drops_the_least_important_fields_first(width: int, line: str) -> None:
    assert format_live_line(totals(), width) == line


figures = st.integers(0, 10**12)
#: As large as a relay's figures get (and larger).


@given(
    st.integers(60, 200),
    figures,
    figures,
    figures,
    st.floats(0.001, 10**7),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.one_of(st.none(), st.floats(0, 10**6)),
)
def test_cost_and_clients_survive_at_60_columns_and_no_field_is_cut(
    width: int,
    tokens: int,
    events: int,
    nbytes: int,
    elapsed: float,
    active: int,
    clients: int,
    cost: float | None,
) -> None:
    shown = totals(
        tokens=tokens,
        events=events,
        bytes=nbytes,
        elapsed_s=elapsed,
        active_clients=active,
        clients=clients,
        cost=cost,
    )
    line = format_live_line(shown, width)
    assert cell_len(line) <= width
    assert "clients " in line and (cost is None or "cost " in line)
    whole = format_totals(shown).split(SEPARATOR)
    for part in line.removeprefix("sserelay: ").split(SEPARATOR):
        # A whole field, or one of its short forms (a label and its figures).
        label = part.split(" ")[0]
        assert part in whole or any(field.startswith(label + " ") for field in whole)


def test_the_in_flight_table_fits_and_drops_columns_least_important_first() -> None:
    meter = Meter(clock=lambda: 100.0)
    for i, model in enumerate(["gpt-4o-mini", "claude-sonnet-4-5-20250929-with-a-long-name"]):
        client = meter.open_client("p", RequestFacts("POST", "/v1/chat/completions", model))
        client.key = "alice" if i else None
        client.record(3, 120 * (i + 1), 500)
    wide = format_in_flight(meter.clients, 103.0, 120)
    assert wide[0].split() == ["in", "flight", "key", "model", "tokens", "tok/s", "s"]
    assert wide[2].split()[-3:] == ["240", "80.0", "3.0"] and "claude-sonnet-4-5-20250…" in wide[2]
    narrow = format_in_flight(meter.clients, 103.0, 40)
    assert all(cell_len(line) <= 40 for line in narrow)
    assert narrow[0].split() == ["model", "tokens", "s"]
    assert format_in_flight([], 0.0, 80) == []
    many = format_in_flight(meter.clients * 5, 103.0, 80, limit=8)
    assert many[-1] == "  … and 2 more" and len(many) == 10


def test_the_bill_rows_fit_80_columns() -> None:
    meter = Meter(price_per_million=2.0, keep_rows=None)
    reasons = ["client_disconnected", "complete", "upstream_error"]
    for i in range(30):
        request = None
        if i % 2:
            request = RequestFacts("POST", "/v1/chat/completions/" + "x" * 40, "gpt-4o-" * 6, 200)
        client = meter.open_client(f"203.0.113.{i}:{50000 + i}", request)
        client.upstream_usage = Usage(123456, 654321, 777777) if request else None
        client.record(99_999, 99_999_999, 10**9)
        meter.close(client, reasons[i % 3])
    text = format_bill(meter.bill("complete"))
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == []
    first = next(line for line in text.splitlines() if line.startswith("  client 1 "))
    assert first.split() == [
        "client", "1", "203.0.113.0:50000", "99,999,999", "tok", "99,999", "ev",
        "client_disconnected",
    ]  # fmt: skip
    assert len(first) == 80
