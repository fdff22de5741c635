"""report.py: `sserelay usage` arithmetic, tables of examples and a hypothesis law."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.ledger import UsageRow
from sserelay.ledger.report import (
    DIMENSIONS,
    FIGURES,
    Group,
    aggregate,
    client_host,
    parse_when,
    table_rows,
    to_csv,
    to_json,
)
from tests.ledger.conftest import make_row

NOW = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
        ("2026-11-26T10:30:00", datetime(2026, 11, 26, 10, 30, tzinfo=UTC)),
        ("2026-11-26T10:30:00Z", datetime(2026, 11, 26, 10, 30, tzinfo=UTC)),
        ("2026-11-26T12:30:00+02:00", datetime(2026, 11, 26, 10, 30, tzinfo=UTC)),
        ("2026-11-26 10:30", datetime(2026, 11, 26, 10, 30, tzinfo=UTC)),
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("30m", NOW - timedelta(minutes=30)),
        ("90s", NOW - timedelta(seconds=90)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1.5h", NOW - timedelta(minutes=90)),
        (" 7d ", NOW - timedelta(days=7)),
    ],
)
def test_parse_when(text: str, instant: datetime) -> None:
    assert parse_when(text, NOW) == instant


@pytest.mark.parametrize("text", ["", "yesterday", "7 days", "-7d", "7y", "2026-13-01", "d7"])
def test_parse_when_refuses_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a date, a datetime or a duration") as caught:
        parse_when(text, NOW)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("127.0.0.1:50000", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("::1", "::1"),
        ("unix-socket", "unix-socket"),
        ("example.org:443", "example.org"),
    ],
)
def test_client_host(peer: str, host: str) -> None:
    assert client_host(peer) == host


def example_rows() -> list[UsageRow]:
    start = datetime(2026, 11, 26, 9, 15, tzinfo=UTC)

    def row(hours: int, key: str | None, model: str | None, **figures: Any) -> UsageRow:
        ended = start + timedelta(hours=hours, seconds=3)
        return make_row(
            started_at=start + timedelta(hours=hours),
            key=key,
            model=model,
            reason=figures.pop("reason", "complete"),
            ended_at=ended,
            **figures,
        )

    return [
        row(0, "team-a", "gpt-4o", tokens=10, events=11, bytes=100, input_tokens=5, cost=0.5),
        row(1, "team-a", "gpt-4o", tokens=20, events=21, bytes=200, input_tokens=7, cost=None),
        row(1, "team-a", "claude", tokens=40, events=41, bytes=400, cost=1.25),
        row(25, "team-b", "gpt-4o", tokens=80, events=81, bytes=800, reason="crashed"),
        row(26, None, None, tokens=160, events=161, bytes=1600, cost=0.0, cached_tokens=0),
    ]


def summary(groups: list[Group]) -> list[tuple[Any, ...]]:
    return [
        (g.values, g.requests, g.tokens, g.input_tokens, g.cached_tokens, g.cost, g.unpriced)
        for g in groups
    ]


def test_group_by_key_then_model() -> None:
    groups = aggregate(example_rows(), ["key", "model"])
    assert summary(groups) == [
        (("team-a", "claude"), 1, 40, None, None, 1.25, 0),
        (("team-a", "gpt-4o"), 2, 30, 12, None, 0.5, 1),
        (("team-b", "gpt-4o"), 1, 80, None, None, None, 1),
        ((None, None), 1, 160, None, 0, 0.0, 0),
        ((None, None), 5, 310, 12, 0, 1.75, 2),
    ]
    assert [group.total for group in groups] == [False] * 4 + [True]


@pytest.mark.parametrize(
    ("by", "values"),
    [
        (["day"], [("2026-11-26",), ("2026-11-27",)]),
        (
            ["hour"],
            [
                ("2026-11-26T09:00Z",),
                ("2026-11-26T10:00Z",),
                ("2026-11-27T10:00Z",),
                ("2026-11-27T11:00Z",),
            ],
        ),
        (["reason"], [("complete",), ("crashed",)]),
        (["client"], [("127.0.0.1",)]),
        (["model", "model"], [("claude",), ("gpt-4o",), (None,)]),
        ([], []),
    ],
)
def test_group_by_each_dimension(by: list[str], values: list[tuple[str | None, ...]]) -> None:
    groups = aggregate(example_rows(), by)
    assert [group.values for group in groups[:-1]] == values
    assert groups[-1].total and groups[-1].requests == 5


def test_an_open_row_groups_under_open_and_an_unknown_dimension_is_refused() -> None:
    assert aggregate([make_row()], ["reason"])[0].values == ("open",)
    with pytest.raises(ValueError, match="cannot group by 'colour'"):
        aggregate([], ["colour"])
    empty = aggregate([], ["key"])
    assert summary(empty) == [((None,), 0, 0, None, None, None, 0)]


def test_json_keeps_its_keys_stable() -> None:
    document = json.loads(to_json(aggregate(example_rows(), ["model"])))
    assert list(document) == ["by", "groups", "total"]
    assert document["by"] == ["model"]
    assert list(document["groups"][0]) == ["model", *FIGURES]
    assert document["groups"][0]["model"] == "claude"
    assert document["groups"][2]["model"] is None
    assert document["total"]["tokens"] == 310 and document["total"]["unpriced"] == 2


def test_csv_marks_the_totals_row_so_no_name_can_pass_for_it() -> None:
    rows = [replace(make_row(model="total"), tokens=3)]
    lines = list(csv.reader(io.StringIO(to_csv(aggregate(rows, ["model"])))))
    assert lines[0] == ["row", "model", *FIGURES]
    assert lines[1][:3] == ["group", "total", "1"]
    assert lines[2][:3] == ["total", "", "1"]
    assert lines[1][FIGURES.index("cost") + 2] == ""  # unpriced: empty, not 0


def test_table_rows_are_text_for_rich() -> None:
    headers, rows = table_rows(aggregate(example_rows(), ["key"]))
    assert headers == ["key", *FIGURES]
    assert rows[0] == ["team-a", "3", "70", "73", "700", "12", "—", "—", "1.750000", "1"]
    assert rows[2][0] == "(none)"
    assert rows[-1][:3] == ["TOTAL", "5", "310"]
    assert table_rows(aggregate([], []))[1] == [["0", "0", "0", "0", "—", "—", "—", "—", "0"]]


optional = st.none() | st.integers(0, 10**6)


@st.composite
def usage_rows(draw: st.DrawFn) -> UsageRow:
    return make_row(
        started_at=draw(
            st.datetimes(datetime(2026, 1, 1), datetime(2026, 1, 3), timezones=st.just(UTC))
        ),
        key=draw(st.sampled_from([None, "a", "b"])),
        model=draw(st.sampled_from([None, "m1", "m2"])),
        client=draw(st.sampled_from(["10.0.0.1:1", "10.0.0.2:2"])),
        tokens=draw(st.integers(0, 10**6)),
        events=draw(st.integers(0, 10**6)),
        bytes=draw(st.integers(0, 10**9)),
        input_tokens=draw(optional),
        output_tokens=draw(optional),
        cached_tokens=draw(optional),
        cost=draw(st.none() | st.floats(0, 1000, allow_nan=False)),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(usage_rows(), max_size=30),
    st.lists(st.sampled_from(DIMENSIONS), max_size=3),
)
def test_the_totals_are_the_sum_of_the_groups_for_any_grouping(
    rows: list[UsageRow], by: list[str]
) -> None:
    *groups, total = aggregate(rows, by)
    if not by:
        assert groups == []
        groups = [total]
    for figure in ("requests", "tokens", "events", "bytes", "unpriced"):
        assert getattr(total, figure) == sum(getattr(group, figure) for group in groups)
    for figure in ("input_tokens", "output_tokens", "cached_tokens"):
        present = [getattr(g, figure) for g in groups if getattr(g, figure) is not None]
        assert getattr(total, figure) == (sum(present) if present else None)
    costs = [group.cost for group in groups if group.cost is not None]
    if costs:
        assert total.cost is not None and math.isclose(total.cost, math.fsum(costs), abs_tol=1e-9)
    else:
        assert total.cost is None
    assert len({group.values for group in groups}) == len(groups)
