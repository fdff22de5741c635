"""The six figures. Each takes one contender and returns an Outcome: numbers, or why not.

All loads are bounded in count and time and go to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from lineup import BENCH, HOST, Contender, Server, exited, help_text, reap, running, spawn
from loadgen import SSEClient, open_stream, percentile


@dataclass
class Outcome:
    """One contender's numbers for one figure; `note` says why there are none (or a caveat)."""

    metrics: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    samples_ns: list[int] = field(default_factory=list, repr=False)  # latency, for pooling


@dataclass(frozen=True)
class Settings:
    workdir: Path
    lines: int = 1_000_000
    latency_lines: int = 2000
    latency_rate: float = 1000.0
    latency_rounds: int = 3
    clients: int = 1000
    fanout_rate: float = 100.0
    fanout_seconds: float = 5.0
    proxy_trials: int = 100
    startup_runs: int = 7
    fanout10k_clients: int = 10_000
    fanout10k_rate: float = 10.0
    fanout10k_seconds: float = 5.0
    capacity_streams: tuple[int, ...] = (100, 500, 1000)
    capacity_rate: float = 50.0
    capacity_warmup: float = 2.0
    capacity_window: float = 5.0
    litellm_max_streams: int = 100
    pin: bool = True  # the capacity figure: the proxy on a CPU of its own
    cluster_clients: int = 300  # per instance
    cluster_rate: float = 100.0
    cluster_seconds: float = 5.0
    cluster_lines: int = 1_000_000

    @property
    def lines_file(self) -> Path:
        return self.workdir / f"lines-{self.lines}.txt"


Figure = Callable[[Contender, Settings], Awaitable[Outcome]]


def write_lines_file(path: Path, count: int) -> None:
    """Short token-like lines, two words each (~10 bytes), the shape of an LLM delta."""
    with path.open("w") as out:
        for start in range(0, count, 100_000):
            out.write("".join(f"tok {i}\n" for i in range(start, min(count, start + 100_000))))


def _ms(ns: float) -> float:
    return ns / 1e6


def _lag_metrics(lags_ns: list[int], prefix: str = "") -> dict[str, float]:
    lags_ns.sort()
    return {
        f"{prefix}p50_ms": _ms(percentile(lags_ns, 0.50)),
        f"{prefix}p99_ms": _ms(percentile(lags_ns, 0.99)),
        f"{prefix}max_ms": _ms(lags_ns[-1]) if lags_ns else float("nan"),
    }


# -- 1. throughput -------------------------------------------------------------


async def throughput(contender: Contender, settings: Settings) -> Outcome:
    """One client, the whole lines file: events/s and MB/s until the client has the last event."""
    timeout = max(60.0, settings.lines / 10_000)
    command = contender.command(str(settings.lines_file))
    async with running(command, expect_exit=contender.exits) as server:
        start = time.monotonic_ns()
        client = await open_stream(HOST, server.port, contender.path)
        try:
            await asyncio.wait_for(asyncio.shield(client.done), timeout)
        except TimeoutError:
            return Outcome(note=f"timeout after {timeout:.0f} s ({client.stats.events} events)")
        finally:
            client.close()
    stats = client.stats
    if stats.events != settings.lines or stats.last_event_ns is None:
        return Outcome(note=f"got {stats.events} of {settings.lines} events")
    seconds = (stats.last_event_ns - start) / 1e9
    return Outcome(
        {
            "events_per_s": stats.events / seconds,
            "mb_per_s": stats.body_bytes / seconds / 1e6,
            "seconds": seconds,
        }
    )


# -- a stamped producer feeding a server's stdin (latency, fan-out) ------------


class Feed:
    """A producer process writing stamped lines into a pipe that becomes a server's stdin."""

    def __init__(self, process: asyncio.subprocess.Process, stdin: int, gate: int) -> None:
        self.process = process
        self.stdin = stdin  # the pipe's read end, for the server
        self._gate = gate
        self._open = [stdin, gate]

    def handed_over(self) -> None:
        """The server holds its copy of the read end: drop ours, so its EOF is the producer's."""
        self._close(self.stdin)

    def go(self) -> None:
        os.write(self._gate, b"go\n")

    def _close(self, fd: int) -> None:
        if fd in self._open:  # once only: a closed fd number may be reused at once
            self._open.remove(fd)
            os.close(fd)

    async def aclose(self) -> None:
        for fd in list(self._open):
            self._close(fd)  # an unstarted producer reads EOF on its gate and writes into EPIPE
        await reap(self.process, 2.0)


@contextlib.asynccontextmanager
async def producing(
    rate: float, count: int, *, cpus: AbstractSet[int] | None = None
) -> AsyncIterator[Feed]:
    """Start bench/producer.py: `count` lines at `rate`/s once `go()` is called."""
    gate_read, gate_write = os.pipe()
    data_read, data_write = os.pipe()
    command = [sys.executable, str(BENCH / "producer.py"), f"--rate={rate}", f"--count={count}"]
    try:
        process = await spawn(command, stdin=gate_read, stdout=data_write, cpus=cpus)
    except BaseException:
        for fd in (gate_write, data_read):
            os.close(fd)
        raise
    finally:
        os.close(gate_read)
        os.close(data_write)  # the producer holds the only write end
    feed = Feed(process, data_read, gate_write)
    try:
        yield feed
    finally:
        await feed.aclose()


# -- 2. latency ----------------------------------------------------------------


async def latency(contender: Contender, settings: Settings) -> Outcome:
    """A producer writes stamped lines at 1 kHz into stdin; write-to-receive latency."""
    count, rate = settings.latency_lines, settings.latency_rate
    async with producing(rate, count) as feed:
        command = contender.command("-")
        async with running(command, stdin=feed.stdin, expect_exit=contender.exits) as server:
            feed.handed_over()
            client = await open_stream(HOST, server.port, stamped=True)
            try:
                await asyncio.wait_for(asyncio.shield(client.headers_received), 10)
                feed.go()
                await asyncio.wait_for(asyncio.shield(client.done), count / rate + 10)
            except TimeoutError:
                pass  # whatever arrived is reported with the shortfall below
            finally:
                client.close()
    lags = client.stats.lags_ns
    if not lags:
        return Outcome(note="no events received")
    outcome = Outcome(_lag_metrics(lags), samples_ns=lags)
    if len(lags) < count:
        outcome.note = f"got {len(lags)} of {count} events"
    return outcome


def merge_rounds(outcomes: list[Outcome]) -> Outcome:
    """One contender's rounds of a figure as one outcome: latency samples are pooled
    (percentiles over every event of every round); any note is kept."""
    if len(outcomes) == 1:
        return outcomes[0]
    notes = sorted({o.note for o in outcomes if o.note})
    samples = [lag for o in outcomes for lag in o.samples_ns]
    if not samples:
        return Outcome(note="; ".join(notes) or "no samples")
    metrics = _lag_metrics(samples) | {"rounds": float(len(outcomes))}
    return Outcome(metrics, "; ".join(notes) or None, samples)


# -- 3 + 4. fan-out and memory -------------------------------------------------


async def _connect_all(port: int, count: int, *, stamped: bool) -> list[SSEClient]:
    """Open `count` streams, 100 at a time so no listen backlog overflows, and wait
    for each response head (the server has subscribed the client); 30 s in all."""
    gate = asyncio.Semaphore(100)
    deadline = time.monotonic() + 30

    async def one() -> SSEClient | None:
        async with gate:
            try:
                client = await open_stream(HOST, port, stamped=stamped)
            except OSError:
                return None
            try:
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(asyncio.shield(client.headers_received), left)
            except Exception:
                client.close()
                return None
            return client

    clients = await asyncio.gather(*(one() for _ in range(count)))
    return [c for c in clients if c is not None]


async def fanout(contender: Contender, settings: Settings) -> Outcome:
    """N clients on one 100 events/s broadcast: delivery lag, server CPU, and RSS per
    idle client (measured before the stream starts, so every client is idle)."""
    if contender.broadcast_note:
        return Outcome(note=contender.broadcast_note)
    count = round(settings.fanout_rate * settings.fanout_seconds)
    warm = min(10, settings.clients // 10)  # first connections pay one-off costs; not per-client
    clients: list[SSEClient] = []
    cpu: CPUMeter | None = None
    async with producing(settings.fanout_rate, count) as feed:
        command = contender.command("-", keep=True)
        async with running(command, stdin=feed.stdin, expect_exit=contender.exits) as server:
            feed.handed_over()
            try:
                clients += await _connect_all(server.port, warm, stamped=True)
                await asyncio.sleep(0.5)
                rss_base = server.rss_bytes()
                clients += await _connect_all(server.port, settings.clients - warm, stamped=True)
                await asyncio.sleep(1.0)  # settle: idle connections, nothing in flight
                rss_full = server.rss_bytes()
                if len(clients) < settings.clients:
                    return Outcome(note=f"only {len(clients)} of {settings.clients} connected")
                cpu = CPUMeter(server)
                feed.go()
                deadline = settings.fanout_seconds + 15
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*(asyncio.shield(c.done) for c in clients)), deadline
                    )
            finally:
                if cpu is not None:
                    await cpu.stop()
                for client in clients:
                    client.close()
    lags = [lag for client in clients for lag in client.stats.lags_ns]
    delivered = len(lags) / (count * len(clients))
    metrics = _lag_metrics(lags, "lag_") if lags else {}
    metrics |= {
        "cpu_pct": cpu.percent if cpu else float("nan"),
        "delivered_pct": 100 * delivered,
        "kib_per_client": (rss_full - rss_base) / (len(clients) - warm) / 1024,
    }
    note = None if delivered >= 0.999 else f"delivered {100 * delivered:.1f}% of events"
    return Outcome(metrics, note)


class HasCPU(Protocol):
    def cpu_seconds(self) -> float: ...


class CPUMeter:
    """The server's CPU use from now on, as % of one core. Sampled every 100 ms, so a
    server that exits at the end of its stream is still measured up to its last moment."""

    def __init__(self, server: HasCPU) -> None:
        self.server = server
        self.start = (server.cpu_seconds(), time.monotonic())
        self.last = self.start
        self.history = [self.start]
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._read()

    def _read(self) -> None:
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone, or a zombie
            self.last = (self.server.cpu_seconds(), time.monotonic())
            self.history.append(self.last)

    async def stop(self) -> None:
        self._read()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def percent(self) -> float:
        wall = self.last[1] - self.start[1]
        return 100 * (self.last[0] - self.start[0]) / wall if wall > 0 else float("nan")

    def percent_until(self, moment: float) -> float:
        """The CPU use from the start to the first sample at or after `moment`
        (time.monotonic()): e.g. the last event delivered, not the shutdown after it."""
        end = next((sample for sample in self.history if sample[1] >= moment), self.last)
        wall = end[1] - self.start[1]
        return 100 * (end[0] - self.start[0]) / wall if wall > 0 else float("nan")


# -- 5. proxy ------------------------------------------------------------------


class UpstreamConnection(asyncio.Protocol):
    """The proxy's upstream side: answers any GET with an endless event stream (one
    event every 10 ms) and records when the proxy closes the socket."""

    def __init__(self, opened: asyncio.Queue[UpstreamConnection]) -> None:
        loop = asyncio.get_running_loop()
        self.opened = opened
        self.closed: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._request = b""
        self._ticker: asyncio.TimerHandle | None = None
        self._seq = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak its API.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._ticker is not None or self.transport is None:
            return
        self._request += data
        if b"\r\n\r\n" in self._request:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            self.opened.put_nowait(self)
            self._tick()

    def _tick(self) -> None:
        assert self.transport is not None
        self._seq += 1
        event = b"id: %d\ndata: tok %d\n\n" % (self._seq, self._seq)
        self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        self._ticker = asyncio.get_running_loop().call_later(0.01, self._tick)

    def _closed(self) -> None:
        if not self.closed.done():
            self.closed.set_result(time.monotonic_ns())
        if self._ticker is not None:
            self._ticker.cancel()

    def eof_received(self) -> bool | None:
        self._closed()  # the proxy's FIN: the moment it let go of the upstream
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()


async def proxy(contender: Contender, settings: Settings) -> Outcome:
    """Client close -> upstream socket close, over N requests through `sserelay proxy`.

    One proxy serves every trial (each request opens its own upstream connection);
    a proxy that exits after its client (`--once` style) is started again."""
    if contender.name != "sserelay":
        return Outcome(note="- (sserelay only)")
    proxy_help = help_text([contender.argv[0], "proxy"])
    if proxy_help is None or "--port" not in proxy_help:
        return Outcome(note="n/a (proxy not available)")
    opened: asyncio.Queue[UpstreamConnection] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(lambda: UpstreamConnection(opened), HOST, 0)
    port = upstream.sockets[0].getsockname()[1]
    command = [contender.argv[0], "proxy", "--upstream", f"http://{HOST}:{port}/", "--port", "0"]
    command += [flag for flag in ("--quiet", "--json") if flag in proxy_help]
    if "--heartbeat" in proxy_help:
        command += ["--heartbeat", "0"]
    gaps: list[int] = []
    failures: list[str] = []
    deadline = time.monotonic() + max(30.0, settings.proxy_trials * 1.0)
    try:
        async with contextlib.AsyncExitStack() as stack:
            server: Server | None = None
            for _ in range(2 * settings.proxy_trials):
                if len(gaps) + len(failures) >= settings.proxy_trials:
                    break
                if time.monotonic() > deadline:
                    failures.append("time budget spent")
                    break
                if server is None or server.process.returncode is not None:
                    await stack.aclose()
                    server = await stack.enter_async_context(running(command))
                try:
                    gaps.append(await _proxy_trial(server.port, opened))
                except Exception as exc:
                    if await exited(server.process, 0.5):
                        continue  # a proxy that served its one request: start another
                    failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        upstream.close()
    if not gaps:
        return Outcome(note=f"n/a (no trial completed: {failures[0] if failures else '?'})")
    outcome = Outcome(_lag_metrics(gaps) | {"trials": float(len(gaps))})
    if failures:
        outcome.note = f"{len(gaps)} of {settings.proxy_trials} trials ({failures[0]})"
    return outcome


async def _proxy_trial(port: int, opened: asyncio.Queue[UpstreamConnection]) -> int:
    while not opened.empty():  # a leftover from a failed trial
        opened.get_nowait()
    client = await open_stream(HOST, port)
    try:
        await asyncio.wait_for(asyncio.shield(client.first_event), 10)
        upstream = await asyncio.wait_for(opened.get(), 5)
        closed_at = time.monotonic_ns()
        client.close()  # FIN, as a browser tab or `curl` being stopped would
        return await asyncio.wait_for(asyncio.shield(upstream.closed), 10) - closed_at
    finally:
        client.close()


# -- 6. start-up ---------------------------------------------------------------


async def _wall_ms(command: list[str]) -> float:
    start = time.perf_counter()
    process = await spawn(command, stdout=asyncio.subprocess.DEVNULL)
    await process.communicate()
    await reap(process)
    if process.returncode != 0:
        raise RuntimeError(f"{command} exited {process.returncode}")
    return (time.perf_counter() - start) * 1e3


async def startup(contender: Contender, settings: Settings) -> Outcome:
    """Time to first event after launch (median); for sserelay also `sserelay --version`,
    for the floor `python -c pass` (the interpreter's own start, the limit for a Python CLI)."""
    source = settings.workdir / "three-lines.txt"
    source.write_text("tok 1\ntok 2\ntok 3\n")
    firsts: list[float] = []
    for _ in range(settings.startup_runs):
        start = time.monotonic_ns()
        command = contender.command(str(source))
        async with running(command, expect_exit=contender.exits) as server:
            client = await open_stream(HOST, server.port)
            try:
                await asyncio.wait_for(asyncio.shield(client.first_event), 20)
                assert client.stats.first_event_ns is not None
                firsts.append(_ms(client.stats.first_event_ns - start))
            finally:
                client.close()
    metrics = {"first_event_ms": statistics.median(firsts)}
    version_command = None
    if contender.name == "sserelay":
        version_command = [contender.argv[0], "--version"]
    elif contender.name == "floor":
        version_command = [sys.executable, "-c", "pass"]
    if version_command:
        await _wall_ms(version_command)  # warm the page cache; not counted
        runs = [await _wall_ms(version_command) for _ in range(settings.startup_runs)]
        metrics["version_ms"] = statistics.median(runs)
    return Outcome(metrics)


FIGURES: dict[str, Figure] = {
    "throughput": throughput,
    "latency": latency,
    "fanout": fanout,
    "proxy": proxy,
    "startup": startup,
}
