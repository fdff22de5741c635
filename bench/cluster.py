"""Several instances on one Redis (issue 16), side by side with one instance, in one run.

Two columns: `cluster`, one publisher (`serve - --redis URL --topic T`) and two followers
(`serve --redis URL --follow T`) on a private Redis (Debian's redis-server, started and
stopped here, nothing saved); `one instance`, plain `sserelay serve -`. Two figures:

- fan-out: the producer (producer.py) writes stamped lines at `cluster_rate`/s into the
  publisher's (or the one instance's) stdin for `cluster_seconds`; three client processes
  (swarm.py) of `cluster_clients` clients each, one per instance (all three on the one
  instance): delivery lag (receive time minus the producer's write stamp: publisher,
  Redis and follower included) p50/p99, events delivered, each instance's CPU.
- throughput: `cluster_lines` short lines (`tok N`) of a file, written into stdin by
  `cat` once a client holds the stream open (so the publisher cannot get ahead of its
  client before the clock starts): events/s to a client of the publisher (the one
  instance), and in the same run to a client of a follower, and each instance's CPU per
  event (what its rate would be on a core of its own: steadier than a rate measured on
  a shared machine). The stream keeps every event (`--history`), so a client slower than
  the publisher misses nothing.

All processes share the machine (nothing is pinned): the cluster's three instances and
Redis on 2 cores is a harder place than one instance alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from capacity import swarm
from figures import CPUMeter, Outcome, Settings, _lag_metrics, producing, write_lines_file
from lineup import BENCH, HOST, Server, ServerError, reap, running, spawn
from loadgen import SSEClient, open_stream
from report import Row, Values

CLUSTER_NAMES = ("cluster", "one instance")
TOPIC = "bench"


def _below(limit: float) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours = values.get("cluster")
        return None if ours is None else ours < limit

    return met


def _at_least(limit: float) -> Callable[[Values], bool | None]:
    def met(values: Values) -> bool | None:
        ours = values.get("cluster")
        return None if ours is None else ours >= limit

    return met


def cluster_rows(settings: Settings) -> tuple[Row, ...]:
    each = f"{settings.cluster_clients:,}"
    at = f"{settings.cluster_rate:g} ev/s"
    one = ("one instance",)
    fans = f"3 x {each} clients at {at}"
    return (
        Row("cluster", "lag_p50_ms", f"{fans}: lag p50, ms", 2, one),
        Row("cluster", "lag_p99_ms", f"{fans}: lag p99, ms", 2, one, "<50 ms", _below(50.0)),
        Row("cluster", "delivered_pct", "events delivered, %", 1),
        Row("cluster", "cpu_pct", "publisher (one instance) CPU, % of a core", 0, one),
        Row("cluster", "follower_cpu_pct", "each follower's CPU, % of a core", 0),
        Row("cluster", "redis_cpu_pct", "redis-server CPU, % of a core", 0),
        Row("cluster", "client_cpu_pct", "the 3 client processes' CPU, % of a core", 0),
        Row(
            "cluster",
            "events_per_s",
            "throughput to a client of the publisher, events/s",
            0,
            one,
            ">=500k",
            _at_least(500_000.0),
        ),
        Row("cluster", "follower_events_per_s", "throughput to a follower's client, events/s", 0),
        Row("cluster", "us_per_event", "publisher (one instance) CPU per event, us", 2, one),
        Row("cluster", "follower_us_per_event", "follower CPU per event, us", 2),
    )


class _Redis:
    """The private Redis of the figure (tests/services.py), as a CPU meter can read it."""

    def __init__(self) -> None:
        sys.path.insert(0, str(BENCH.parent))
        from tests.services import start_redis

        self.server = start_redis()

    @property
    def url(self) -> str:
        return self.server.url

    def cpu_seconds(self) -> float:
        assert self.server.service is not None
        stat = Path(f"/proc/{self.server.service.pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def flush(self) -> None:
        self.server.flush()

    def remove(self) -> None:
        self.server.remove()


def _serve(exe: Sequence[str], *args: str) -> list[str]:
    return [
        *exe,
        "serve",
        "--quiet",
        "--json",
        "--heartbeat",
        "0",
        "--no-ledger",
        "--port",
        "0",
        *args,
    ]


@contextlib.asynccontextmanager
async def _instances(
    exe: Sequence[str], redis: _Redis | None, stdin: int, *publisher_args: str
) -> AsyncIterator[list[Server]]:
    """The publisher (or the one instance) reading `stdin`, then the followers."""
    async with contextlib.AsyncExitStack() as stack:
        if redis is None:
            command = _serve(exe, "-", "--keep", *publisher_args)
            yield [await stack.enter_async_context(running(command, stdin=stdin))]
            return
        topic = ("--redis", redis.url)
        followers = [
            await stack.enter_async_context(
                running(_serve(exe, *topic, "--follow", TOPIC, *publisher_args))
            )
            for _ in range(2)
        ]
        command = _serve(exe, "-", *topic, "--topic", TOPIC, "--keep", *publisher_args)
        publisher = await stack.enter_async_context(running(command, stdin=stdin))
        yield [publisher, *followers]


async def _fanout(exe: Sequence[str], redis: _Redis | None, settings: Settings) -> dict[str, float]:
    count = round(settings.cluster_rate * settings.cluster_seconds)
    async with producing(settings.cluster_rate, count) as feed:
        async with _instances(exe, redis, feed.stdin) as servers:
            feed.handed_over()
            ports = [server.port for server in servers] * (3 // len(servers))
            async with contextlib.AsyncExitStack() as stack:
                loads = []
                for n, port in enumerate(ports):
                    where = settings.workdir / f"swarm-{n}"
                    where.mkdir(exist_ok=True)
                    loads.append(await stack.enter_async_context(swarm(port, where, stamp="seq")))
                for load in loads:
                    await load.connect(settings.cluster_clients)
                await asyncio.sleep(1.0)  # settle: idle connections, nothing in flight
                began = time.monotonic_ns()
                for load in loads:
                    await load.arm(began, began + int((settings.cluster_seconds + 15) * 1e9))
                meters = [CPUMeter(server) for server in servers]
                redis_meter = CPUMeter(redis) if redis is not None else None
                client_meters = [CPUMeter(load) for load in loads]
                feed.go()
                try:
                    outcomes = [await load.result() for load in loads]
                finally:
                    for meter in [*meters, *client_meters, *([redis_meter] if redis_meter else [])]:
                        await meter.stop()
    lags = [lag for _, delays in outcomes for lag in delays]
    last = max((summary["last_event_ns"] or 0) for summary, _ in outcomes) / 1e9
    metrics = _lag_metrics(lags, "lag_") if lags else {}
    metrics["delivered_pct"] = 100 * len(lags) / (count * settings.cluster_clients * 3)
    metrics["cpu_pct"] = meters[0].percent_until(last)
    metrics["client_cpu_pct"] = sum(m.percent_until(last) for m in client_meters)
    if redis_meter is not None:
        metrics["follower_cpu_pct"] = sum(m.percent_until(last) for m in meters[1:]) / 2
        metrics["redis_cpu_pct"] = redis_meter.percent_until(last)
    return metrics


async def _throughput(
    exe: Sequence[str], redis: _Redis | None, settings: Settings
) -> dict[str, float]:
    lines = settings.cluster_lines
    path = settings.workdir / f"cluster-lines-{lines}.txt"
    if not path.exists():
        write_lines_file(path, lines)
    read_end, write_end = os.pipe()
    try:
        history = ("--history", str(lines))
        async with _instances(exe, redis, read_end, *history) as servers:
            os.close(read_end)
            read_end = -1
            clients: list[SSEClient] = []
            for server in servers[:2]:
                clients.append(await open_stream(HOST, server.port))
                await asyncio.wait_for(asyncio.shield(clients[-1].headers_received), 10)
            meters = [CPUMeter(server) for server in servers]
            start = time.monotonic_ns()
            cat = await spawn(["cat", str(path)], stdout=write_end)
            os.close(write_end)
            write_end = -1
            timeout = max(60.0, lines / 20_000)
            try:
                for client in clients:
                    await asyncio.wait_for(asyncio.shield(client.done), timeout)
            finally:
                for meter in meters:
                    await meter.stop()
                for client in clients:
                    client.close()
                await reap(cat, 5.0)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    rates = []
    for client in clients:
        stats = client.stats
        if stats.events != lines or stats.last_event_ns is None:
            raise ServerError(f"a client got {stats.events} of {lines} events")
        rates.append(stats.events / ((stats.last_event_ns - start) / 1e9))
    metrics = {"events_per_s": rates[0]}
    # CPU per event: what the figure would be on a core of its own, less noisy than a rate.
    used = [(meter.last[0] - meter.start[0]) * 1e6 / lines for meter in meters]
    metrics["us_per_event"] = used[0]
    if len(rates) > 1:
        metrics["follower_events_per_s"] = rates[1]
        metrics["follower_us_per_event"] = used[1]
    return metrics


async def cluster(
    settings: Settings, log: Callable[[str], None], exe: str | None = None
) -> dict[str, Outcome]:
    """Both columns of the cluster table. `exe` is the sserelay to bench (default: `python
    -m sserelay` with this Python, so `PYTHONPATH=$PWD` benches a work tree)."""
    command = (exe,) if exe else (sys.executable, "-m", "sserelay")
    try:
        redis = _Redis()
    except Exception as exc:  # redis-server missing: the table says so
        note = f"n/a ({exc})"
        return {name: Outcome(note=note) for name in CLUSTER_NAMES}
    results: dict[str, Outcome] = {}
    try:
        for name in CLUSTER_NAMES:
            backend = redis if name == "cluster" else None
            metrics: dict[str, float] = {}
            notes = []
            for figure in (_fanout, _throughput):
                started = time.monotonic()
                redis.flush()
                try:
                    metrics |= await asyncio.wait_for(figure(command, backend, settings), 240)
                except Exception as exc:
                    notes.append(f"{figure.__name__[1:]}: {type(exc).__name__}: {exc}"[:200])
                took = time.monotonic() - started
                log(f"   cluster {name:<13} {figure.__name__[1:]:<10} {took:5.1f} s")
            results[name] = Outcome(metrics, "; ".join(notes) or None)
    finally:
        redis.remove()
    return results


__all__ = ["CLUSTER_NAMES", "cluster", "cluster_rows"]
