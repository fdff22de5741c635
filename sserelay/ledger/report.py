"""The aggregation behind `sserelay usage`: pure functions over rows, no I/O.

    rows = await ledger.query(parse_when("7d", now), None)
    groups = aggregate(rows, ["key", "model"])     # the groups, then one totals row
    print(to_csv(groups))                          # or to_json(groups), or table_rows(groups)

Reported token sums (`input_tokens`, `output_tokens`, `cached_tokens`) and `cost` are
None-aware: a group none of whose rows reported (or was priced) keeps None, never 0, and
`unpriced` counts the requests without a cost, so a partial cost is never taken for a
whole one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from .row import UsageRow

#: The dimensions `--by` accepts, in the order they may be given.
DIMENSIONS = ("key", "model", "day", "hour", "reason", "client")

#: The figures of a group, in column order.
FIGURES = (
    "requests",
    "tokens",
    "events",
    "bytes",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost",
    "unpriced",
)

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime) -> datetime:
    """The instant `text` names, as an aware UTC datetime.

    `2026-11-26` is that day's midnight UTC; an ISO 8601 datetime is taken as written
    (without an offset: UTC); `30m`, `24h`, `7d` (also `s`, `w`) are that long before `now`.
    Raises ValueError with a one-line message for anything else."""
    stripped = text.strip()
    relative = _RELATIVE.fullmatch(stripped)
    if relative:
        amount, unit = relative.groups()
        return now.astimezone(UTC) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        if len(stripped) == 10:
            return datetime.combine(date.fromisoformat(stripped), time(), UTC)
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(f"not a date, a datetime or a duration like 24h or 7d: {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def dimension_value(row: UsageRow, dimension: str) -> str | None:
    """What `row` groups under for `dimension`; None for a key or model it does not have.

    `day` and `hour` come from `started_at` in UTC; `reason` is `open` for a row still
    running; `client` is the peer's host, without its port (a port is one connection, not
    one client)."""
    if dimension == "key":
        return row.key
    if dimension == "model":
        return row.model
    if dimension == "day":
        return row.started_at.strftime("%Y-%m-%d")
    if dimension == "hour":
        return row.started_at.strftime("%Y-%m-%dT%H:00Z")
    if dimension == "reason":
        return row.reason if row.reason is not None else "open"
    if dimension == "client":
        return client_host(row.client)
    raise ValueError(f"cannot group by {dimension!r}; choose from {', '.join(DIMENSIONS)}")


def client_host(peer: str) -> str:
    """`host` of `host:port` or `[v6]:port`; the text itself when it has no port."""
    host, colon, port = peer.rpartition(":")
    if not colon or not port.isdigit():
        return peer
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    if ":" in host:  # a bare IPv6 address: its last group is not a port
        return peer
    return host


@dataclass(frozen=True, slots=True)
class Group:
    """The sums over the rows that share `values` (one per dimension of `by`). The totals
    row has `total` True and every value None."""

    by: tuple[str, ...]
    values: tuple[str | None, ...]
    requests: int
    tokens: int
    events: int
    bytes: int
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    cost: float | None
    unpriced: int
    total: bool = False

    def figures(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIGURES}


def _optional_sum(values: Iterable[int | None]) -> int | None:
    present = [value for value in values if value is not None]
    return sum(present) if present else None


def _group(
    by: tuple[str, ...], values: tuple[str | None, ...], rows: Sequence[UsageRow], total: bool
) -> Group:
    costs = [row.cost for row in rows if row.cost is not None]
    return Group(
        by=by,
        values=values,
        requests=len(rows),
        tokens=sum(row.tokens for row in rows),
        events=sum(row.events for row in rows),
        bytes=sum(row.bytes for row in rows),
        input_tokens=_optional_sum(row.input_tokens for row in rows),
        output_tokens=_optional_sum(row.output_tokens for row in rows),
        cached_tokens=_optional_sum(row.cached_tokens for row in rows),
        # fsum: a sum of many small prices must not drift with the order of the rows
        cost=math.fsum(costs) if costs else None,
        unpriced=len(rows) - len(costs),
        total=total,
    )


def aggregate(rows: Iterable[UsageRow], by: Sequence[str]) -> list[Group]:
    """One Group per distinct combination of the `by` dimensions (in the order given; a
    dimension given twice counts once), sorted by their values (None last), then the
    totals row. With `by` empty, only the totals row. Raises ValueError for an unknown
    dimension."""
    dimensions = tuple(dict.fromkeys(by))
    for dimension in dimensions:
        if dimension not in DIMENSIONS:
            raise ValueError(f"cannot group by {dimension!r}; choose from {', '.join(DIMENSIONS)}")
    every = list(rows)
    buckets: dict[tuple[str | None, ...], list[UsageRow]] = {}
    if dimensions:
        for row in every:
            values = tuple(dimension_value(row, dimension) for dimension in dimensions)
            buckets.setdefault(values, []).append(row)
    order = sorted(buckets, key=lambda values: [(value is None, value or "") for value in values])
    groups = [_group(dimensions, values, buckets[values], False) for values in order]
    groups.append(_group(dimensions, (None,) * len(dimensions), every, True))
    return groups


def to_json(groups: Sequence[Group]) -> str:
    """`{"by": [...], "groups": [{<dimension>: value, ..., <figure>: value}], "total":
    {<figure>: value}}`, keys always in this order."""
    by = list(groups[-1].by) if groups else []
    document = {
        "by": by,
        "groups": [
            {**dict(zip(group.by, group.values, strict=True)), **group.figures()}
            for group in groups
            if not group.total
        ],
        "total": next((group.figures() for group in groups if group.total), None),
    }
    return json.dumps(document, indent=2)


def to_csv(groups: Sequence[Group]) -> str:
    """A header, one line per group, and the totals line; the first column, `row`, says
    `group` or `total` (so no model or key name can pass for the totals). None is empty."""
    by = list(groups[-1].by) if groups else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", *by, *FIGURES])
    for group in groups:
        figures = ["" if value is None else value for value in group.figures().values()]
        values = ["" if value is None else value for value in group.values]
        writer.writerow(["total" if group.total else "group", *values, *figures])
    return buffer.getvalue()


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def table_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of text for a table (the CLI feeds them to rich): counts with
    thousands separators, cost to 6 decimals, `—` for none reported, `(none)` for a
    missing key or model, `TOTAL` on the totals row."""
    by = list(groups[-1].by) if groups else []
    headers = [*by, *FIGURES]
    rows: list[list[str]] = []
    for group in groups:
        if group.total:
            values = ["TOTAL", *([""] * (len(by) - 1))] if by else []
        else:
            values = ["(none)" if value is None else value for value in group.values]
        rows.append(
            [
                *values,
                _count(group.requests),
                _count(group.tokens),
                _count(group.events),
                _count(group.bytes),
                _count(group.input_tokens),
                _count(group.output_tokens),
                _count(group.cached_tokens),
                "—" if group.cost is None else f"{group.cost:,.6f}",
                _count(group.unpriced),
            ]
        )
    return headers, rows
