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

from capacity import PROXY_NAMES, Placement, Proxy, capacity, discover_proxies, fanout10k
from cluster import CLUSTER_NAMES, cluster, cluster_rows
from figures import FIGURES, Figure, Outcome, Settings, merge_rounds, write_lines_file
from lineup import BENCH, NAMES, Contender, discover, kill_leftovers, workdir
from report import ROWS, Results, build, capacity_rows, render
from variants import (
    OVERHEAD_NAMES,
    TOKENIZER_NAMES,
    overhead_rows,
    overheads,
    tokenizer_rows,
    tokenizers,
)

T = TypeVar("T")
ALIASES = {"memory": "fanout"}  # memory is measured in the fan-out session
#: The figures each contender of the serve lineup runs, in order.
SERVE_FIGURES: dict[str, Figure] = {
    name: figure
    for name, figure in [*FIGURES.items(), ("fanout10k", fanout10k)]
    if name != "startup"
} | {"startup": FIGURES["startup"]}
#: Every figure: `capacity` runs its own lineup (PROXY_NAMES), `cluster` its own two columns
#: (sserelay on Redis, and one instance: CLUSTER_NAMES), `tokenizers` and `overheads` serve
#: with other options (variants.py: TOKENIZER_NAMES, OVERHEAD_NAMES).
ALL_FIGURES = (*SERVE_FIGURES, "capacity", "cluster", "tokenizers", "overheads")
ALL_NAMES = (*NAMES, *(name for name in PROXY_NAMES if name not in NAMES))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="smaller loads (defaults below)")
    parser.add_argument(
        "--only",
        default=",".join(ALL_NAMES),
        help=f"contenders, comma-separated (default: all of {','.join(ALL_NAMES)}; "
        f"{','.join(n for n in PROXY_NAMES if n not in NAMES)} run the capacity figure only)",
    )
    parser.add_argument(
        "--figures",
        default=",".join(ALL_FIGURES),
        help=f"figures, comma-separated (default: {','.join(ALL_FIGURES)}; memory = fanout)",
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
        "--streams",
        type=_ints,
        help="capacity: concurrent streams, comma-separated (100,500,1000; 100)",
    )
    parser.add_argument("--capacity-window", type=float, help="capacity: measured seconds (5; 2)")
    parser.add_argument("--capacity-warmup", type=float, help="capacity: seconds before (2; 1)")
    parser.add_argument(
        "--litellm-max-streams",
        type=int,
        help="capacity: largest N LiteLLM runs at (100; it saturates below)",
    )
    parser.add_argument("--fanout10k-clients", type=int, help="fanout10k clients (10000; 2000)")
    parser.add_argument("--fanout10k-seconds", type=float, help="fanout10k stream length (5; 2)")
    parser.add_argument(
        "--cluster-clients", type=int, help="cluster: clients per instance (300; 100)"
    )
    parser.add_argument("--cluster-seconds", type=float, help="cluster: stream length (5; 2)")
    parser.add_argument(
        "--cluster-lines", type=int, help="cluster: throughput lines (1,000,000; 200,000)"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="capacity: do not give the proxy a CPU of its own",
    )
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
    args.figures = [name for name in ALL_FIGURES if name in figures]
    unknown = set(args.only) - set(ALL_NAMES)
    if unknown:
        parser.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    unknown = set(figures) - set(ALL_FIGURES)
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
        fanout10k_clients=pick(args.fanout10k_clients, 10_000, 2000),
        fanout10k_seconds=pick(args.fanout10k_seconds, 5.0, 2.0),
        capacity_streams=pick(args.streams, (100, 500, 1000), (100,)),
        capacity_window=pick(args.capacity_window, 5.0, 2.0),
        capacity_warmup=pick(args.capacity_warmup, 2.0, 1.0),
        litellm_max_streams=pick(args.litellm_max_streams, 100, 100),
        pin=not args.no_pin,
        cluster_clients=pick(args.cluster_clients, 300, 100),
        cluster_seconds=pick(args.cluster_seconds, 5.0, 2.0),
        cluster_lines=pick(args.cluster_lines, 1_000_000, 200_000),
    )


def raise_fd_limit(sockets: int) -> str | None:
    """Each client socket here (or in the swarm process) has a peer in the server:
    lift the soft limit (children inherit it) as far as the hard limit allows.
    Returns a warning if the hard limit is too low for `sockets`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = sockets + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if hard != resource.RLIM_INFINITY and hard < want:
        return (
            f"the fd hard limit ({hard}) is below the {want} the largest figure needs: "
            "raise it (ulimit -Hn, as root) or expect failed connections"
        )
    return None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(outcome: Outcome) -> str:
    numbers = ", ".join(f"{k}={v:,.3g}" for k, v in outcome.metrics.items())
    return "; ".join(part for part in (numbers, outcome.note) if part)


async def bench(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[Contender], list[Proxy], Results]:
    serve_figures = [f for f in args.figures if f in SERVE_FIGURES]
    lineup = (
        discover([n for n in args.only if n in NAMES], settings.workdir, args.sserelay)
        if serve_figures
        else []
    )
    proxies = (
        discover_proxies(
            [n for n in args.only if n in PROXY_NAMES],
            args.sserelay,
            settings.litellm_max_streams,
        )
        if "capacity" in args.figures
        else []
    )
    for name, note in [(c.name, c.note) for c in lineup] + [(p.name, p.note) for p in proxies]:
        if note is not None:
            log(f"{name}: {note}")
    if {"throughput", "tokenizers", "overheads"} & set(args.figures):
        write_lines_file(settings.lines_file, settings.lines)
    results: Results = {}
    for figure in args.figures:
        if figure == "capacity":
            started = time.monotonic()
            results[figure] = await capacity(proxies, settings, log)
            log(f"{figure:>10} all           {time.monotonic() - started:5.1f} s")
            continue
        if figure == "cluster":
            results[figure] = await cluster(settings, log, args.sserelay)
            continue
        if figure == "tokenizers":
            results[figure] = await tokenizers(settings, log, args.sserelay)
            continue
        if figure == "overheads":
            results[figure] = await overheads(settings, log, args.sserelay)
            continue
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
                    outcome = await asyncio.wait_for(
                        SERVE_FIGURES[figure](contender, settings), 240
                    )
                except Exception as exc:
                    outcome = Outcome(note=f"error: {type(exc).__name__}: {exc}"[:300])
                rounds[contender.name].append(outcome)
                took = time.monotonic() - started
                log(f"{figure:>10} {contender.name:<13} {took:5.1f} s  {_summary(outcome)}")
        results[figure] = {
            c.name: merge_rounds(rounds[c.name]) if c.available else Outcome(note=c.note)
            for c in lineup
        }
    return lineup, proxies, results


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
    proxies: list[Proxy],
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
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "placement": Placement.for_machine(settings.pin).describe(),
        "contenders": {
            c.name: {"available": c.available, "note": c.note, "broadcast_note": c.broadcast_note}
            for c in lineup
        },
        "proxies": {
            p.name: {"available": p.available, "note": p.note, "command": p.argv} for p in proxies
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    where = workdir()
    # The proxy keeps its default ledger on, as a user runs it (its cost is in the figures),
    # but in the bench's own directory: never in the user's ~/.local/state/sserelay.
    os.environ["XDG_STATE_HOME"] = str(where / "state")
    settings = settings_for(args, where)
    sockets = settings.clients
    if "fanout10k" in args.figures:
        sockets = max(sockets, settings.fanout10k_clients)
    if "capacity" in args.figures:
        sockets = max(sockets, 2 * max(settings.capacity_streams))  # nginx: two per stream
    if warning := raise_fd_limit(sockets):
        log(f"note: {warning}")
    # Other work on the machine shows up in every figure: record it, and say so.
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        log(f"note: load average {load_before[0]:.2f} before the run; figures will be noisy")
    started = time.monotonic()
    try:
        lineup, proxies, results = _run(bench(args, settings))
    finally:
        kill_leftovers()
        shutil.rmtree(where, ignore_errors=True)
    footnotes: list[str] = []
    tables = []
    if lineup:
        names = [c.name for c in lineup]
        tables.append((build(results, names, ROWS, footnotes)[0], names))
    if proxies:
        names = [p.name for p in proxies]
        specs = capacity_rows(settings.capacity_streams, settings.capacity_rate)
        tables.append((build(results, names, specs, footnotes)[0], names))
    ours = {}
    if "cluster" in results:
        names = list(CLUSTER_NAMES)
        rows = build(results, names, cluster_rows(settings), footnotes, ours="cluster")[0]
        tables.append((rows, names))
        ours[id(rows)] = "cluster"
    if "tokenizers" in results:
        names = list(TOKENIZER_NAMES)
        rows = build(results, names, tokenizer_rows(), footnotes, ours="o200k_base")[0]
        tables.append((rows, names))
        ours[id(rows)] = "o200k_base"
    if "overheads" in results:
        names = list(OVERHEAD_NAMES)
        rows = build(results, names, overhead_rows(), footnotes)[0]
        tables.append((rows, names))
    print(
        "\n\n".join(
            render(rows, [], names, ours.get(id(rows), "sserelay"))
            for rows, names in tables
            if rows
        ),
        flush=True,
    )
    if footnotes:
        print("\n" + "\n".join(footnotes), flush=True)
    rows = [row for table, _ in tables for row in table]
    document = {
        "meta": _meta(args, settings, lineup, proxies, load_before)
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
