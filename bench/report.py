"""One table (figure, each contender, ratio, goal) as text and as JSON.

Ratios are sserelay / the named reference, whatever the unit: 2.0x on a rate
means twice as fast, 1.2x on a latency means 20% slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from figures import Outcome

Values = dict[str, float | None]
#: figure -> contender -> outcome
Results = dict[str, dict[str, Outcome]]


@dataclass(frozen=True)
class Row:
    figure: str
    metric: str
    label: str
    digits: int = 1
    compare: tuple[str, ...] = ()  # references in the ratio column
    goal: str = ""
    met: Callable[[Values], bool | None] | None = None


def _at_least(factors: dict[str, float]) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours = values.get("sserelay")
        refs = {name: values.get(name) for name in factors}
        if ours is None or any(v is None for v in refs.values()):
            return None
        return all(ours >= factor * (refs[name] or 0.0) for name, factor in factors.items())

    return met


def _at_most_times(reference: str, factor: float) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours, ref = values.get("sserelay"), values.get(reference)
        return None if ours is None or ref is None else ours <= factor * ref

    return met


def _below(limit: float) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours = values.get("sserelay")
        return None if ours is None else ours < limit

    return met


def _at_most(limit: float) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours = values.get("sserelay")
        return None if ours is None else ours <= limit

    return met


ROWS: tuple[Row, ...] = (
    Row(
        "throughput",
        "events_per_s",
        "throughput, events/s",
        0,
        ("sse-starlette", "go"),
        ">=2x sse-starlette, >=1x go",
        _at_least({"sse-starlette": 2.0, "go": 1.0}),
    ),
    Row("throughput", "mb_per_s", "throughput, MB/s", 1),
    Row("latency", "p50_ms", "latency p50, ms", 3, ("floor",)),
    Row(
        "latency",
        "p99_ms",
        "latency p99, ms",
        3,
        ("floor",),
        "<=1.5x floor",
        _at_most_times("floor", 1.5),
    ),
    Row("latency", "max_ms", "latency max, ms", 3, ("floor",)),
    Row("fanout", "lag_p50_ms", "fan-out lag p50, ms", 2, ("floor",)),
    Row("fanout", "lag_p99_ms", "fan-out lag p99, ms", 2, ("floor",), "<50 ms", _below(50.0)),
    Row("fanout", "cpu_pct", "fan-out server CPU, % of a core", 0, ("floor",)),
    Row(
        "fanout",
        "kib_per_client",
        "memory per idle client, KiB",
        1,
        ("floor",),
        "<32 KiB",
        _below(32.0),
    ),
    Row("fanout10k", "lag_p50_ms", "fan-out 10k lag p50, ms", 2, ("go", "floor")),
    Row(
        "fanout10k",
        "lag_p99_ms",
        "fan-out 10k lag p99, ms",
        2,
        ("go", "floor"),
        "<100 ms",
        _below(100.0),
    ),
    Row("fanout10k", "cpu_pct", "fan-out 10k server CPU, % of a core", 0, ("go", "floor")),
    Row("fanout10k", "client_cpu_pct", "fan-out 10k clients' CPU, % of a core", 0),
    Row("fanout10k", "delivered_pct", "fan-out 10k events delivered, %", 1),
    Row(
        "fanout10k",
        "kib_per_client",
        "memory per idle client at 10k, KiB",
        1,
        ("go", "floor"),
        "<=16 KiB",
        _at_most(16.0),
    ),
    Row("proxy", "p50_ms", "proxy close->upstream close p50, ms", 2),
    Row("proxy", "p99_ms", "proxy close->upstream close p99, ms", 2),
    Row(
        "startup",
        "version_ms",
        "`--version` wall, ms (floor: python -c pass)",
        0,
        ("floor",),
        "<150 ms",
        _below(150.0),
    ),
    Row("startup", "first_event_ms", "launch -> first event, ms", 0, ("floor",)),
)


def capacity_rows(streams: Sequence[int], rate: float) -> tuple[Row, ...]:
    """The proxy capacity table: one block of rows per N (the goals are issue 17's, at 1,000)."""
    rows: list[Row] = []
    for n in streams:
        key, at = f"n{n}_", f"N={n:,}:"
        big = n >= 1000
        rows += [
            Row("capacity", f"{key}delay_p50_ms", f"{at} added delay p50, ms", 1, ("nginx",)),
            Row(
                "capacity",
                f"{key}delay_p99_ms",
                f"{at} added delay p99, ms",
                1,
                ("nginx",),
                "<50 ms" if big else "",
                _below(50.0) if big else None,
            ),
            Row("capacity", f"{key}cpu_pct", f"{at} proxy CPU, % of a core", 0, ("nginx",)),
            Row(
                "capacity",
                f"{key}events_per_s",
                f"{at} events/s delivered (offered {n * rate:,.0f})",
                0,
            ),
            Row(
                "capacity",
                f"{key}us_per_event",
                f"{at} proxy CPU per event, us",
                1,
                ("nginx",),
                "<=2x nginx" if big else "",
                _at_most_times("nginx", 2.0) if big else None,
            ),
            Row("capacity", f"{key}upstream_cpu_pct", f"{at} upstream CPU, % of a core", 0),
            Row("capacity", f"{key}client_cpu_pct", f"{at} clients' CPU, % of a core", 0),
            Row("capacity", f"{key}other_cpu_pct", f"{at} anything else's CPU, %", 0),
        ]
    return tuple(rows)


@dataclass(frozen=True)
class Cell:
    value: float | None
    text: str


def _format(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:,.{digits}f}"


def build(
    results: Results,
    names: Sequence[str],
    specs: Sequence[Row] = ROWS,
    footnotes: list[str] | None = None,
    ours: str = "sserelay",
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows (as JSON-ready dicts) of `specs` for the figures that ran, and the
    footnotes (appended to `footnotes` when given: tables built one after another
    share one numbering). Ratios are the column `ours` over each reference."""
    notes: dict[tuple[str, str], int] = {}
    footnotes = [] if footnotes is None else footnotes

    def footnote(figure: str, name: str, note: str) -> str:
        key = (figure, name)
        if key not in notes:
            footnotes.append(f"[{len(footnotes) + 1}] {name}, {figure}: {note}")
            notes[key] = len(footnotes)
        return f" [{notes[key]}]"

    rows: list[dict[str, Any]] = []
    for row in specs:
        outcomes = results.get(row.figure)
        if outcomes is None:
            continue
        values: Values = {}
        cells: dict[str, str] = {}
        for name in names:
            outcome = outcomes.get(name)
            value = outcome.metrics.get(row.metric) if outcome else None
            values[name] = value
            text = "-" if value is None else _format(value, row.digits)
            if outcome is not None and outcome.note:
                if value is None and outcome.note.startswith("-"):
                    text = "-"  # not applicable by design: no footnote
                elif value is None:
                    text = "n/a" + footnote(row.figure, name, outcome.note)
                else:
                    text += footnote(row.figure, name, outcome.note)
            cells[name] = text
        ratios = []
        mine = values.get(ours)
        for ref in row.compare:
            theirs = values.get(ref)
            if mine is not None and theirs and not math.isnan(mine) and not math.isnan(theirs):
                ratios.append(f"{mine / theirs:.2f}x {ref}")
        met = row.met(values) if row.met else None
        goal = row.goal
        if row.goal:
            goal += ": " + {True: "met", False: "MISSED", None: "not measured"}[met]
        rows.append(
            {
                "figure": row.figure,
                "metric": row.metric,
                "label": row.label,
                "values": values,
                "cells": cells,
                "ratio": ", ".join(ratios),
                "goal": goal,
                "met": met,
            }
        )
    return rows, footnotes


def render(
    rows: list[dict[str, Any]],
    footnotes: Sequence[str],
    names: Sequence[str],
    ours: str = "sserelay",
) -> str:
    """One table; `footnotes` printed below it (pass none to print them elsewhere)."""
    header = ["figure", *names, f"ratio ({ours} / ref)", "goal"]
    table = [header]
    for row in rows:
        table.append(
            [row["label"], *(row["cells"][name] for name in names), row["ratio"], row["goal"]]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        numbers = [cell.rjust(width) for cell, width in zip(rest[:-2], widths[1:-2], strict=True)]
        tail = [cells[-2].ljust(widths[-2]), cells[-1]]
        return "  ".join([first.ljust(widths[0]), *numbers, *tail]).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(cells) for cells in table[1:]]
    if footnotes:
        out += ["", *footnotes]
    return "\n".join(out)
