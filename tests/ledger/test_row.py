"""UsageRow: validation at the door, JSON round trips, ids, and the pure modules' imports."""

from __future__ import annotations

import ast
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.ledger import UsageRow, is_valid_request_id, new_instance_id, new_request_id
from sserelay.ledger.row import COLUMNS, format_timestamp, parse_timestamp
from tests.ledger.conftest import T0, make_row

LEDGER = Path(__file__).resolve().parents[2] / "sserelay" / "ledger"


def test_the_columns_are_the_user_facing_names_in_order() -> None:
    assert COLUMNS == (
        "id",
        "instance",
        "started_at",
        "first_token_at",
        "ended_at",
        "client",
        "key",
        "method",
        "path",
        "model",
        "status",
        "reason",
        "tokens",
        "events",
        "bytes",
        "tokenizer",
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "usage_source",
        "cost",
        "last_event_id",
    )


def test_to_json_gives_iso_utc_text_and_from_json_gives_the_row_back() -> None:
    east = timezone(timedelta(hours=3))
    row = make_row(
        started_at=datetime(2026, 11, 27, 21, 54, 33, 123456, tzinfo=east),
        ended_at=datetime(2026, 11, 27, 18, 55, tzinfo=UTC),
        reason="complete",
        cost=1,
    )
    document = row.to_json()
    assert list(document) == list(COLUMNS)
    assert document["started_at"] == "2026-11-27T18:54:33.123456Z"
    assert document["ended_at"] == "2026-11-27T18:55:00.000000Z"
    assert document["first_token_at"] is None
    assert document["cost"] == 1.0 and isinstance(document["cost"], float)
    assert row.started_at.tzinfo is UTC
    assert UsageRow.from_json(document) == row


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"id": ""}, "request id"),
        ({"id": "x" * 201}, "request id"),
        ({"id": "a\nb"}, "request id"),
        ({"instance": ""}, "instance"),
        ({"started_at": datetime(2026, 1, 1)}, "aware datetime"),
        ({"tokens": -1}, "tokens"),
        ({"events": True}, "events"),
        ({"bytes": 1.5}, "bytes"),
        ({"input_tokens": -3}, "input_tokens"),
        ({"status": 42}, "HTTP status"),
        ({"usage_source": "guessed"}, "usage_source"),
        ({"cost": math.nan}, "finite"),
        ({"cost": -0.01}, "finite"),
        ({"cost": "1"}, "number"),
        ({"reason": "complete"}, "together"),
        ({"ended_at": T0}, "together"),
        ({"model": 4}, "model"),
        ({"tokens": 2**63}, "2\\*\\*63-1"),
    ],
)
def test_a_bad_row_is_refused_when_made(changes: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_row(**changes)


def test_from_json_names_missing_and_unknown_columns() -> None:
    document = make_row().to_json()
    del document["tokens"]
    document["extra"] = 1
    with pytest.raises(ValueError, match=r"missing \['tokens'\], unknown \['extra'\]"):
        UsageRow.from_json(document)
    with pytest.raises(ValueError, match="UTC offset"):
        UsageRow.from_json({**make_row().to_json(), "started_at": "2026-11-27T18:54:33"})


def test_ids() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", value) for value in ids)
    assert new_instance_id() != new_instance_id()
    assert is_valid_request_id("client-trace-7f")
    assert not is_valid_request_id("evil\r\nx-admin: 1")
    assert not is_valid_request_id("")


def test_timestamps_sort_as_text_in_the_order_of_the_instants() -> None:
    moments = [T0 + timedelta(microseconds=n * 999_999) for n in range(50)]
    assert sorted(format_timestamp(m) for m in moments) == [format_timestamp(m) for m in moments]
    assert parse_timestamp("2026-11-27T18:54:33Z") == datetime(2026, 11, 27, 18, 54, 33, tzinfo=UTC)


texts = st.text(min_size=0, max_size=20)
counts = st.integers(min_value=0, max_value=2**53)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def rows(draw: st.DrawFn) -> UsageRow:
    ended = draw(st.booleans())
    return UsageRow(
        id=draw(st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=30)),
        instance=draw(st.text(min_size=1, max_size=10)),
        started_at=draw(moments),
        first_token_at=draw(st.none() | moments),
        ended_at=draw(moments) if ended else None,
        client=draw(texts),
        key=draw(st.none() | texts),
        method=draw(texts),
        path=draw(texts),
        model=draw(st.none() | texts),
        status=draw(st.none() | st.integers(100, 999)),
        reason=draw(texts) if ended else None,
        tokens=draw(counts),
        events=draw(counts),
        bytes=draw(counts),
        tokenizer=draw(texts),
        input_tokens=draw(st.none() | counts),
        output_tokens=draw(st.none() | counts),
        cached_tokens=draw(st.none() | counts),
        usage_source=draw(st.sampled_from(["reported", "metered"])),
        cost=draw(st.none() | st.floats(min_value=0, allow_infinity=False, allow_nan=False)),
        last_event_id=draw(st.none() | texts),
    )


@settings(max_examples=60)
@given(rows())
def test_json_round_trips_any_row(row: UsageRow) -> None:
    import json

    assert UsageRow.from_json(json.loads(json.dumps(row.to_json()))) == row


@pytest.mark.parametrize("module", ["row", "report", "errors"])
def test_the_pure_modules_do_no_io(module: str) -> None:
    tree = ast.parse((LEDGER / f"{module}.py").read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "sqlite3", "psycopg", "socket", "os", "subprocess"}
