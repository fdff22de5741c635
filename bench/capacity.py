"""The capacity figures: many slow streams at once, CPU per event.

- `capacity` (proxy capacity): N concurrent streaming chat requests, each at
  50 events/s from bench/upstream.py, through each proxy contender (and
  straight to the upstream: the floor). Per N: added delay per event
  (client receive - upstream send) p50/p99, the proxy's CPU (every process
  of it, from /proc), events/s delivered and µs of CPU per event, over a
  fixed window after a warm-up.
- `fanout10k`: the fan-out figure at 10,000 clients x 10 events/s, with the
  clients in a process of their own (bench/swarm.py).

The capacity figure keeps the measured proxy on a core of its own where there
are two: the proxy is pinned to the last CPU, the load (upstream and the swarm
of clients) to the others, so the load's CPU does not compete with the
proxy's and "% CPU" is "% of the proxy's one core". fanout10k is not pinned
(see there).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from figures import CPUMeter, Outcome, Settings, _lag_metrics, producing
from lineup import (
    BENCH,
    CLOCK_TICKS,
    HOST,
    Contender,
    Server,
    ServerError,
    free_port,
    reap,
    running,
    running_on,
    spawn,
)

#: Column order of the capacity table; `direct` is the floor (no proxy at all).
PROXY_NAMES = ("sserelay", "nginx", "litellm", "direct")
#: A venv with `litellm[proxy]` installed (or its `litellm` executable): the optional contender.
LITELLM_ENV = "SSERELAY_BENCH_LITELLM"
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps(
    {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "count"}]}
)


# -- CPUs: who runs where -------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which CPUs the measured server gets, and which the load (None: no pinning)."""

    server: frozenset[int] | None = None
    load: frozenset[int] | None = None

    @classmethod
    def for_machine(cls, pin: bool) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls()
        return cls(frozenset(cpus[-1:]), frozenset(cpus[:-1]))

    def describe(self) -> str:
        if self.server is None or self.load is None:
            return "not pinned: server and load share every CPU"
        return (
            f"server on CPU {','.join(map(str, sorted(self.server)))}; upstream or producer "
            f"and clients on CPU {','.join(map(str, sorted(self.load)))}"
        )


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine spent not idle (/proc/stat), for telling how
    much other work shared the machine with a figure."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every process under it (nginx's workers, a
    multi-process server), from /proc/*/stat. A child that exited is no longer counted."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces
        child = int(entry.name)
        parents[child] = int(fields[1])
        ticks[child] = int(fields[11]) + int(fields[12])
    family = {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return sum(ticks.get(p, 0) for p in family) / CLOCK_TICKS


# -- the swarm of clients, in its own process -------------------------------------


class Swarm:
    """The parent's side of bench/swarm.py: connect, measure, read the delays."""

    def __init__(self, process: asyncio.subprocess.Process, samples: Path) -> None:
        self.process = process
        self.samples = samples
        self._end_ns = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    async def _ask(self, line: str, timeout: float) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not answer:
            stderr = b""
            if self.process.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    stderr = await asyncio.wait_for(self.process.stderr.read(), 2)
            raise ServerError(f"swarm exited: {stderr.decode(errors='replace')[-300:]}")
        return answer.decode().strip()

    async def connect(self, count: int) -> tuple[int, int]:
        """Open `count` more streams: (streams open in all, connections that failed)."""
        _, total, failed = (await self._ask(f"connect {count}", 120)).split()
        return int(total), int(failed)

    async def arm(self, start_ns: int, end_ns: int) -> None:
        """Start recording the events received in [start_ns, end_ns); returns once the
        swarm is recording, so a source started after it loses no first event."""
        answer = await self._ask(f"measure {start_ns} {end_ns}", 30)
        if answer != "measuring":
            raise ServerError(f"swarm answered {answer[:100]!r} to measure")
        self._end_ns = end_ns

    async def result(self) -> tuple[dict[str, float], list[int]]:
        """Once the window is over (sooner if every stream ends): the swarm's summary
        and the delays, in ns."""
        assert self.process.stdout is not None
        timeout = (self._end_ns - time.monotonic_ns()) / 1e9 + 30
        answer = (await asyncio.wait_for(self.process.stdout.readline(), timeout)).decode()
        if not answer.startswith("result "):
            raise ServerError(f"swarm ended without a result: {answer[:100]!r}")
        summary: dict[str, float] = json.loads(answer.removeprefix("result "))
        delays = array.array("q")
        delays.frombytes(self.samples.read_bytes())
        return summary, delays.tolist()


@contextlib.asynccontextmanager
async def swarm(
    port: int,
    workdir: Path,
    *,
    stamp: str,
    post: tuple[str, str] | None = None,
    headers: Sequence[str] = (),
    cpus: frozenset[int] | None = None,
) -> AsyncIterator[Swarm]:
    """Start bench/swarm.py against `port` (GET / unless `post` = (path, body))."""
    samples = workdir / f"delays-{port}.bin"
    command = [
        sys.executable,
        str(BENCH / "swarm.py"),
        f"--port={port}",
        f"--stamp={stamp}",
        f"--samples={samples}",
        *(f"--header={h}" for h in headers),
    ]
    if post is not None:
        command += [f"--post={post[0]}", f"--body={post[1]}"]
    process = await spawn(command, stdin=subprocess.PIPE, cpus=cpus)
    try:
        yield Swarm(process, samples)
    finally:
        if process.stdin is not None:
            process.stdin.close()  # EOF: it closes every stream and exits
        await reap(process, 5.0)
        samples.unlink(missing_ok=True)


# -- the proxy contenders --------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    name: str
    argv: tuple[str, ...] = ()  # sserelay: the command before `proxy`; litellm: its executable
    note: str | None = None  # why it cannot run
    max_streams: int | None = None  # above this N the cell is "-" (a saturated contender)

    @property
    def available(self) -> bool:
        return self.note is None


def discover_proxies(
    only: Sequence[str], sserelay: str | None, litellm_max_streams: int
) -> list[Proxy]:
    """The selected proxy contenders in table order, each runnable or carrying its reason.
    `sserelay` is an executable to bench instead of `python -m sserelay`."""
    lineup: list[Proxy] = []
    for name in PROXY_NAMES:
        if name not in only:
            continue
        if name == "sserelay":
            argv = (sserelay,) if sserelay else (sys.executable, "-m", "sserelay")
            lineup.append(Proxy(name, argv))
        elif name == "nginx":
            nginx = shutil.which("nginx") or next(
                (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
            )
            note = None if nginx else "n/a (nginx not installed: apt-get install -y nginx)"
            lineup.append(Proxy(name, (nginx,) if nginx else (), note))
        elif name == "litellm":
            lineup.append(_litellm(litellm_max_streams))
        else:
            lineup.append(Proxy(name))
    return lineup


def _litellm(max_streams: int) -> Proxy:
    where = os.environ.get(LITELLM_ENV)
    if not where:
        return Proxy(
            "litellm",
            note=f"n/a (set {LITELLM_ENV} to a venv with litellm[proxy] installed)",
        )
    path = Path(where)
    exe = path / "bin" / "litellm" if path.is_dir() else path
    if not os.access(exe, os.X_OK):
        return Proxy("litellm", note=f"n/a ({LITELLM_ENV}: no litellm executable at {exe})")
    return Proxy("litellm", (str(exe),), max_streams=max_streams)


NGINX_CONF = """\
# Generated by bench/capacity.py: a plain reverse proxy for SSE, nothing metered.
daemon off;
master_process on;
worker_processes 1;
{user}pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream bench {{
        server {host}:{upstream_port};
        keepalive 1024;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_config(prefix: Path, port: int, upstream_port: int, streams: int) -> Path:
    """Write nginx.conf for a proxy on `port` in front of the upstream; returns its path."""
    # Run as whoever runs the bench: as root, nginx would switch its worker to `nobody`.
    user = ""
    if os.geteuid() == 0:
        import grp
        import pwd

        entry = pwd.getpwuid(0)
        user = f"user {entry.pw_name} {grp.getgrgid(entry.pw_gid).gr_name};\n"
    connections = 2 * streams + 512  # a client and an upstream connection per stream
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            prefix=prefix,
            nofile=connections + 256,
            connections=connections,
            host=HOST,
            port=port,
            upstream_port=upstream_port,
        )
    )
    return conf


LITELLM_CONF = """\
# Generated by bench/capacity.py: one model, an OpenAI-compatible upstream.
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: http://{host}:{upstream_port}/v1
      api_key: sk-bench-upstream
"""


@dataclass
class Running:
    """A started proxy contender: where clients go, its process (None: direct), the
    headers a client must send."""

    port: int
    server: Server | None
    headers: tuple[str, ...] = ()


@contextlib.asynccontextmanager
async def start_proxy(
    proxy: Proxy, upstream_port: int, streams: int, workdir: Path, cpus: frozenset[int] | None
) -> AsyncIterator[Running]:
    upstream_url = f"http://{HOST}:{upstream_port}/"
    if proxy.name == "direct":
        yield Running(upstream_port, None)
    elif proxy.name == "sserelay":
        command = [*proxy.argv, "proxy", "--upstream", upstream_url, "--port", "0", "--quiet"]
        async with running(command, cpus=cpus) as server:
            yield Running(server.port, server)
    elif proxy.name == "nginx":
        prefix = Path(os.path.realpath(workdir)) / f"nginx-{streams}"
        prefix.mkdir(exist_ok=True)
        port = free_port()
        conf = nginx_config(prefix, port, upstream_port, streams)
        command = [*proxy.argv, "-e", "stderr", "-p", str(prefix), "-c", str(conf)]
        async with running_on(command, port, cpus=cpus) as server:
            yield Running(port, server)
    elif proxy.name == "litellm":
        conf = workdir / "litellm.yaml"
        conf.write_text(LITELLM_CONF.format(host=HOST, upstream_port=upstream_port))
        port = free_port()
        key = "sk-bench-" + os.urandom(16).hex()
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": key,  # it refuses to start without one
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at start-up
            "LITELLM_LOG": "ERROR",
        }
        command = [
            *proxy.argv,
            "--config",
            str(conf.resolve()),
            "--host",
            HOST,
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--telemetry",
            "False",
        ]
        async with running_on(command, port, env=env, cpus=cpus, timeout=120) as server:
            yield Running(port, server, (f"Authorization: Bearer {key}",))
    else:
        raise ValueError(f"unknown proxy contender {proxy.name!r}")


# -- the capacity figure -------------------------------------------------------------


async def capacity_one(
    proxy: Proxy, streams: int, settings: Settings, placement: Placement
) -> tuple[dict[str, float], str | None]:
    """One contender at N streams: its metrics (keys `n{N}_...`) and a note, if any."""
    workdir = settings.workdir
    upstream_command = [
        sys.executable,
        str(BENCH / "upstream.py"),
        f"--interval={1 / settings.capacity_rate}",
        # Every stream outlives the run: the window never sees one end.
        f"--seconds={settings.capacity_warmup + settings.capacity_window + 120}",
    ]
    key = f"n{streams}_"
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(running(upstream_command, cpus=placement.load))
        started = await stack.enter_async_context(
            start_proxy(proxy, upstream.port, streams, workdir, placement.server)
        )
        clients = await stack.enter_async_context(
            swarm(
                started.port,
                workdir,
                stamp="content",
                post=(CHAT_PATH, CHAT_BODY),
                headers=started.headers,
                cpus=placement.load,
            )
        )
        connected, failed = await clients.connect(streams)
        if connected == 0:
            return {}, f"N={streams}: no stream connected"
        start_ns = time.monotonic_ns() + int(settings.capacity_warmup * 1e9)
        end_ns = start_ns + int(settings.capacity_window * 1e9)
        await clients.arm(start_ns, end_ns)
        await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))

        def cpu() -> tuple[float, float, float, int, float]:
            proxy_cpu = tree_cpu_seconds(started.server.pid) if started.server else 0.0
            swarm_cpu = tree_cpu_seconds(clients.pid)
            now = time.monotonic_ns()
            return (proxy_cpu, upstream.cpu_seconds(), swarm_cpu, now, machine_busy_seconds())

        before = cpu()
        await asyncio.sleep(max(0.0, (end_ns - time.monotonic_ns()) / 1e9))
        after = cpu()
        summary, delays = await clients.result()
    wall = (after[3] - before[3]) / 1e9
    seconds = summary["seconds"]
    metrics = {
        f"{key}upstream_cpu_pct": 100 * (after[1] - before[1]) / wall,
        f"{key}client_cpu_pct": 100 * (after[2] - before[2]) / wall,
        f"{key}events_per_s": len(delays) / seconds if seconds > 0 else float("nan"),
        f"{key}offered_per_s": connected * settings.capacity_rate,
        # Whatever else ran on the machine meanwhile (another test suite): noise to know of.
        f"{key}other_cpu_pct": 100
        * ((after[4] - before[4]) - sum(after[i] - before[i] for i in range(3)))
        / wall,
    }
    if delays:
        metrics |= _lag_metrics(delays, f"{key}delay_")
    if started.server is not None:
        proxy_cpu = after[0] - before[0]
        metrics[f"{key}cpu_pct"] = 100 * proxy_cpu / wall
        if delays:
            metrics[f"{key}us_per_event"] = 1e6 * proxy_cpu / len(delays)
    notes = []
    if failed or connected < streams:
        notes.append(f"{connected} of {streams} streams connected")
    if summary["ended"]:
        notes.append(f"{int(summary['ended'])} streams ended early")
    if metrics[f"{key}client_cpu_pct"] > 90:
        notes.append("the clients' CPU was saturated: delays are partly theirs")
    return metrics, f"N={streams}: " + "; ".join(notes) if notes else None


async def capacity(
    lineup: Sequence[Proxy], settings: Settings, log: Callable[[str], None]
) -> dict[str, Outcome]:
    """Every proxy contender at every N of settings.capacity_streams."""
    placement = Placement.for_machine(settings.pin)
    log(f"  capacity: {placement.describe()}")
    metrics: dict[str, dict[str, float]] = {p.name: {} for p in lineup}
    notes: dict[str, list[str]] = {p.name: [] for p in lineup}
    for streams in settings.capacity_streams:
        for proxy in lineup:
            if not proxy.available:
                continue
            if proxy.max_streams is not None and streams > proxy.max_streams:
                continue  # reported as "-" below
            began = time.monotonic()
            try:
                got, note = await asyncio.wait_for(
                    capacity_one(proxy, streams, settings, placement), 240
                )
            except Exception as exc:
                got, note = {}, f"N={streams}: error: {type(exc).__name__}: {exc}"[:300]
            metrics[proxy.name] |= got
            if note:
                notes[proxy.name].append(note)
            key = f"n{streams}_"
            shown = {k.removeprefix(key): v for k, v in got.items()}
            summary = ", ".join(f"{k}={v:,.3g}" for k, v in shown.items())
            log(
                f"  capacity N={streams:<5} {proxy.name:<9} {time.monotonic() - began:5.1f} s  "
                + "; ".join(p for p in (summary, note) if p)
            )
    outcomes: dict[str, Outcome] = {}
    for proxy in lineup:
        if not proxy.available:
            outcomes[proxy.name] = Outcome(note=proxy.note)
            continue
        note = "; ".join(notes[proxy.name]) or None
        if proxy.max_streams is not None and any(
            n > proxy.max_streams for n in settings.capacity_streams
        ):
            skipped = f"run up to N={proxy.max_streams} (saturated well before)"
            note = f"{note}; {skipped}" if note else skipped
        outcomes[proxy.name] = Outcome(metrics[proxy.name], note)
    return outcomes


# -- fan-out at 10,000 clients ---------------------------------------------------------

FANOUT10K = ("sserelay", "go", "floor")


async def fanout10k(contender: Contender, settings: Settings) -> Outcome:
    """The fan-out figure at settings.fanout10k_clients x fanout10k_rate events/s, the
    clients in a process of their own: delivery lag, server CPU, RSS per idle client."""
    if contender.name not in FANOUT10K:
        return Outcome(note="- (run for sserelay, go and the floor)")
    if contender.broadcast_note:
        return Outcome(note=contender.broadcast_note)
    # Not pinned, as in the 1,000-client figure: a broadcast is a burst (10,000 writes,
    # then 10,000 reads) and then idle; pinned, server and clients could not overlap their
    # bursts, and the floor's lag p99 went from ~95 ms to ~530 ms (measured, 2 cores).
    placement = Placement()
    clients = settings.fanout10k_clients
    rate, seconds = settings.fanout10k_rate, settings.fanout10k_seconds
    count = round(rate * seconds)
    warm = min(10, clients // 10)  # the first connections pay one-off costs; not per client
    cpu: CPUMeter | None = None
    async with producing(rate, count, cpus=placement.load) as feed:
        command = contender.command("-", keep=True)
        async with running(
            command, stdin=feed.stdin, expect_exit=contender.exits, cpus=placement.server
        ) as server:
            feed.handed_over()
            async with swarm(
                server.port, settings.workdir, stamp="seq", cpus=placement.load
            ) as load:
                await load.connect(warm)
                await asyncio.sleep(0.5)
                rss_base = server.rss_bytes()
                connected, _ = await load.connect(clients - warm)
                await asyncio.sleep(1.0)  # settle: idle connections, nothing in flight
                rss_full = server.rss_bytes()
                if connected < clients:
                    return Outcome(note=f"only {connected} of {clients} connected")
                began = time.monotonic_ns()
                await load.arm(began, began + int((seconds + 15) * 1e9))
                cpu, client_cpu = CPUMeter(server), CPUMeter(load)
                feed.go()
                # Until every stream has ended (the producer's last line), bounded.
                try:
                    summary, lags = await load.result()
                finally:
                    await cpu.stop()
                    await client_cpu.stop()
    delivered = len(lags) / (count * clients)
    metrics = _lag_metrics(lags, "lag_") if lags else {}
    # CPU while the events flowed: a server that then closes 10,000 streams and writes
    # a 10,000-row bill is busy a while longer, which is not fan-out.
    busy_until = (summary["last_event_ns"] or time.monotonic_ns()) / 1e9
    metrics |= {
        "cpu_pct": cpu.percent_until(busy_until),
        "client_cpu_pct": client_cpu.percent_until(busy_until),
        "delivered_pct": 100 * delivered,
        "kib_per_client": (rss_full - rss_base) / (connected - warm) / 1024,
    }
    note = None if delivered >= 0.999 else f"delivered {100 * delivered:.1f}% of events"
    return Outcome(metrics, note)
