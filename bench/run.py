"""Benchmark sserelay against the stacks a user would otherwise pick, in one run.

    python bench/run.py            # the full run: about 2 minutes on 2 cores
    python bench/run.py --quick    # smaller loads, well under a minute

Starts each contender on a free 127.0.0.1 port, drives it with the same
load generator (bench/loadgen.py), prints one table and writes the same as
JSON (bench/results.json). Every child process is stopped before it exits.
See bench/README.md for what each figure measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from figures import FIGURES, Outcome, Settings, merge_rounds, write_lines_file
from lineup import BENCH, NAMES, Contender, discover, kill_leftovers, workdir
from report import Results, build, render

T = TypeVar("T")
ALIASES = {"memory": "fanout"}  # memory is measured in the fan-out session


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="smaller loads (defaults below)")
    parser.add_argument(
        "--only",
        default=",".join(NAMES),
        help=f"contenders, comma-separated (default: all of {','.join(NAMES)})",
    )
    parser.add_argument(
        "--figures",
        default=",".join(FIGURES),
        help=f"figures, comma-separated (default: {','.join(FIGURES)}; memory = fanout)",
    )
    parser.add_argument("--lines", type=int, help="throughput lines (1,000,000; quick 100,000)")
    parser.add_argument("--latency-lines", type=int, help="latency lines at 1 kHz (2000; 500)")
    parser.add_argument(
        "--latency-rounds", type=int, help="latency runs per contender, pooled (3; 1)"
    )
    parser.add_argument("--clients", type=int, help="fan-out clients (1000; 200)")
    parser.add_argument("--fanout-seconds", type=float, help="fan-out stream length (5; 2)")
    parser.add_argument("--proxy-trials", type=int, help="proxy trials (100; 10)")
    parser.add_argument("--startup-runs", type=int, help="start-up repetitions (7; 3)")
    parser.add_argument(
        "--sserelay",
        metavar="EXE",
        help="the sserelay executable to bench (default: the one beside this Python)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=BENCH / "results.json",
        help="where to write the JSON (default: bench/results.json)",
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    figures = [ALIASES.get(f.strip(), f.strip()) for f in args.figures.split(",") if f.strip()]
    args.figures = [name for name in FIGURES if name in figures]
    unknown = set(args.only) - set(NAMES)
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    unknown = set(figures) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    return args


def settings_for(args: argparse.Namespace, where: Path) -> Settings:
    quick = args.quick

    def pick(given: Any, full: Any, small: Any) -> Any:
        return given if given is not None else (small if quick else full)

    return Settings(
        workdir=where,
        lines=pick(args.lines, 1_000_000, 100_000),
        latency_lines=pick(args.latency_lines, 2000, 500),
        latency_rounds=pick(args.latency_rounds, 3, 1),
        clients=pick(args.clients, 1000, 200),
        fanout_seconds=pick(args.fanout_seconds, 5.0, 2.0),
        proxy_trials=pick(args.proxy_trials, 100, 10),
        startup_runs=pick(args.startup_runs, 7, 3),
    )


def raise_fd_limit(clients: int) -> None:
    """1,000 client sockets here and 1,000 in the server: lift the soft limit (children
    inherit it) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * clients + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(outcome: Outcome) -> str:
    numbers = ", ".join(f"{k}={v:,.3g}" for k, v in outcome.metrics.items())
    return "; ".join(part for part in (numbers, outcome.note) if part)


async def bench(args: argparse.Namespace, settings: Settings) -> tuple[list[Contender], Results]:
    lineup = discover(args.only, settings.workdir, args.sserelay)
    for contender in lineup:
        if not contender.available:
            log(f"{contender.name}: {contender.note}")
    if "throughput" in args.figures:
        write_lines_file(settings.lines_file, settings.lines)
    results: Results = {}
    for figure in args.figures:
        runnable = [c for c in lineup if c.available]
        rounds: dict[str, list[Outcome]] = {c.name: [] for c in runnable}
        count = settings.latency_rounds if figure == "latency" else 1
        for index in range(count):
            # Rotate the order each round, so a burst of other work on the machine
            # does not always land on the same contender.
            shift = index % len(runnable) if runnable else 0
            for contender in runnable[shift:] + runnable[:shift]:
                started = time.monotonic()
                try:
                    # A hung contender must not hang the bench: every figure is bounded.
                    outcome = await asyncio.wait_for(FIGURES[figure](contender, settings), 240)
                except Exception as exc:
                    outcome = Outcome(note=f"error: {type(exc).__name__}: {exc}"[:300])
                rounds[contender.name].append(outcome)
                took = time.monotonic() - started
                log(f"{figure:>10} {contender.name:<13} {took:5.1f} s  {_summary(outcome)}")
        results[figure] = {
            c.name: merge_rounds(rounds[c.name]) if c.available else Outcome(note=c.note)
            for c in lineup
        }
    return lineup, results


def _run(main: Coroutine[Any, Any, T]) -> T:
    # uvloop when installed: the lighter the load generator, the more the numbers are the server's.
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _meta(
    args: argparse.Namespace,
    settings: Settings,
    lineup: list[Contender],
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    go = shutil.which("go")
    go_version = (
        subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout.strip()
        if go
        else None
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "go": go_version,
        "quick": args.quick,
        "settings": {k: v for k, v in vars(settings).items() if k != "workdir"},
        "contenders": {
            c.name: {"available": c.available, "note": c.note, "broadcast_note": c.broadcast_note}
            for c in lineup
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = workdir()
    settings = settings_for(args, where)
    raise_fd_limit(settings.clients)
    # Other work on the machine shows up in every figure: record it, and say so.
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"note: load average {load_before[0]:.2f} before the run; figures will be noisy")
    started = time.monotonic()
    try:
        lineup, results = _run(bench(args, settings))
    finally:
        kill_leftovers()
        shutil.rmtree(where, ignore_errors=True)
    names = [c.name for c in lineup]
    rows, footnotes = build(results, names)
    print(render(rows, footnotes, names), flush=True)
    document = {
        "meta": _meta(args, settings, lineup, load_before)
        | {"seconds": time.monotonic() - started},
        "rows": rows,
        "footnotes": footnotes,
        "figures": {
            figure: {
                name: {"metrics": outcome.metrics, "note": outcome.note}
                for name, outcome in outcomes.items()
            }
            for figure, outcomes in results.items()
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    log(f"wrote {args.json} in {time.monotonic() - started:.0f} s")
    return 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be computed is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
