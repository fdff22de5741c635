"""The contenders, how to start one, and how to make sure it stops.

Every contender speaks one command line (see contenders/common.py):
`... --port 0 [--keep] SOURCE`, and announces `serving on http://HOST:PORT/`
on stderr. A `Server` is one running contender: started, announced, its
pipes drained, its CPU and RSS readable from /proc, and always stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CONTENDERS = BENCH / "contenders"
HOST = "127.0.0.1"
ANNOUNCE = re.compile(rb"serving on http://127\.0\.0\.1:(\d+)/")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Column order of the table.
NAMES = ("sserelay", "sse-starlette", "aiohttp-sse", "go", "floor")


@dataclass(frozen=True)
class Contender:
    name: str
    argv: tuple[str, ...]  # the command, before the common options
    note: str | None = None  # why it cannot run at all
    broadcast_note: str | None = None  # why it cannot run the fan-out figures
    exits: bool = False  # ends by itself when its stream ends (sserelay); others are stopped
    path: str = "/"  # what its clients GET (with a ?token=, say)

    @property
    def available(self) -> bool:
        return self.note is None

    def command(self, source: str, *, keep: bool = False) -> list[str]:
        return [*self.argv, "--port", "0", *(["--keep"] if keep else []), source]


def sserelay_executable() -> str | None:
    # The console script next to this interpreter first: the venv's sserelay.
    beside = Path(sys.executable).parent / "sserelay"
    return str(beside) if beside.exists() else shutil.which("sserelay")


def help_text(argv: Sequence[str]) -> str | None:
    """The `--help` of a command, or None if it fails (e.g. no such subcommand)."""
    try:
        done = subprocess.run(
            [*argv, "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def build_go(workdir: Path) -> tuple[str | None, str | None]:
    """Build the Go reference into `workdir`: (binary, None) or (None, why not)."""
    go = shutil.which("go")
    if go is None:
        return None, "n/a (go not installed: apt-get install golang-go)"
    binary = workdir / "ref-go"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    if not os.access(Path.home(), os.W_OK):  # the build cache needs a writable home
        env["GOCACHE"] = str(workdir / "gocache")
    try:
        done = subprocess.run(
            [go, "build", "-o", str(binary), "main.go"],
            cwd=CONTENDERS / "go",
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, "n/a (go build timed out)"
    if done.returncode != 0:
        return None, f"n/a (go build failed: {done.stderr.strip()[:200]})"
    return str(binary), None


def discover(only: Sequence[str], workdir: Path, sserelay: str | None = None) -> list[Contender]:
    """The selected contenders in table order, each runnable or carrying its reason.
    `sserelay` is the executable to bench (default: the installed one)."""
    lineup: list[Contender] = []
    python = sys.executable
    for name in NAMES:
        if name not in only:
            continue
        if name == "sserelay":
            exe = sserelay or sserelay_executable()
            if exe is None:
                lineup.append(Contender(name, (), note="n/a (sserelay not installed)"))
                continue
            serve_help = help_text([exe, "serve"]) or ""
            lineup.append(
                Contender(
                    name,
                    (exe, "serve", "--quiet", "--json", "--heartbeat", "0"),
                    exits=True,
                    broadcast_note=None
                    if "--keep" in serve_help
                    else "n/a (needs the broadcast hub, issue 3)",
                )
            )
        elif name == "sse-starlette":
            lineup.append(_python_ref(name, "ref_starlette.py", ("sse_starlette", "uvicorn")))
        elif name == "aiohttp-sse":
            lineup.append(_python_ref(name, "ref_aiohttp.py", ("aiohttp", "aiohttp_sse")))
        elif name == "go":
            binary, why = build_go(workdir)
            lineup.append(Contender(name, (binary,) if binary else (), note=why))
        else:
            lineup.append(Contender(name, (python, str(CONTENDERS / "floor.py"))))
    return lineup


def _python_ref(name: str, script: str, modules: Sequence[str]) -> Contender:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    note = (
        f"n/a ({', '.join(missing)} not installed: pip install -e '.[bench]')" if missing else None
    )
    return Contender(name, (sys.executable, str(CONTENDERS / script)), note=note)


class ServerError(Exception):
    """A contender did not start, or died."""


class Server:
    """One running contender process."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.stderr_tail = b""
        self.stdout = b""
        self._drains: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU of the process so far (all its threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()  # the name may hold spaces
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * PAGE_SIZE

    def _drain(self) -> None:
        async def tail_stderr(stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(65536):
                self.stderr_tail = (self.stderr_tail + chunk)[-4096:]

        async def keep_stdout(stream: asyncio.StreamReader) -> None:
            while chunk := await stream.read(65536):
                self.stdout = (self.stdout + chunk)[-65536:]

        assert self.process.stderr is not None and self.process.stdout is not None
        self._drains = [
            asyncio.create_task(tail_stderr(self.process.stderr)),
            asyncio.create_task(keep_stdout(self.process.stdout)),
        ]

    async def stop(self, *, expect_exit: bool = False) -> int:
        """End the process: a moment to exit by itself if `expect_exit`, then SIGTERM,
        then SIGKILL. Returns its exit status."""
        status = await reap(self.process, 1.0 if expect_exit else 0.0)
        for task in self._drains:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 1.0)
        return status


#: Every process the bench started and has not reaped: killed at exit, whatever happened.
_LIVE: set[asyncio.subprocess.Process] = set()


def kill_leftovers() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    _LIVE.clear()


async def spawn(
    command: Sequence[str],
    *,
    stdin: int = subprocess.DEVNULL,
    stdout: int = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    cpus: AbstractSet[int] | None = None,
) -> asyncio.subprocess.Process:
    """Start a tracked child process (stderr piped); `env` replaces the environment,
    `cpus` pins it (and every process or thread it starts) to those CPUs."""
    pin = _pinner(set(cpus)) if cpus else None
    process = await asyncio.create_subprocess_exec(
        *command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, preexec_fn=pin
    )
    _LIVE.add(process)
    return process


def _pinner(cpus: set[int]) -> Callable[[], None]:
    def pin() -> None:  # in the child, before exec: nothing it starts escapes the set
        os.sched_setaffinity(0, cpus)

    return pin


async def exited(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether the process ends within `timeout` seconds."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), timeout)
    return process.returncode is not None


async def reap(process: asyncio.subprocess.Process, timeout: float = 2.0) -> int:
    """Give a child `timeout` seconds to end by itself, then SIGTERM, then SIGKILL;
    returns its exit status."""
    if timeout <= 0 or not await exited(process, timeout):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        if not await exited(process, 2.0):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    status = await process.wait()
    _LIVE.discard(process)
    return status


@contextlib.asynccontextmanager
async def running(
    command: Sequence[str],
    *,
    stdin: int = subprocess.DEVNULL,
    expect_exit: bool = False,
    timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
    cpus: AbstractSet[int] | None = None,
) -> AsyncIterator[Server]:
    """Start a contender, wait for its announcement, yield it, and always stop it."""
    process = await spawn(command, stdin=stdin, env=env, cpus=cpus)
    assert process.stderr is not None
    seen = b""
    server: Server | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                while server is None:
                    line = await process.stderr.readline()
                    if not line:
                        await process.wait()
                        raise ServerError(
                            f"exited {process.returncode} before serving: "
                            f"{seen.decode(errors='replace').strip()[-300:]}"
                        )
                    seen += line
                    if match := ANNOUNCE.search(line):
                        server = Server(process, int(match.group(1)))
        except TimeoutError:
            raise ServerError(
                f"no 'serving on' line within {timeout:.0f} s: "
                f"{seen.decode(errors='replace').strip()[-300:]!r}"
            ) from None
        server._drain()
        yield server
    finally:
        if server is None:
            server = Server(process, 0)
        await server.stop(expect_exit=expect_exit)


@contextlib.asynccontextmanager
async def running_on(
    command: Sequence[str],
    port: int,
    *,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    cpus: AbstractSet[int] | None = None,
) -> AsyncIterator[Server]:
    """`running()` for a server that announces nothing (nginx, LiteLLM): started on
    the `port` it was told, ready once that port accepts a connection."""
    process = await spawn(command, env=env, cpus=cpus)
    server = Server(process, port)
    server._drain()
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if process.returncode is not None or await exited(process, 0.0):
                raise ServerError(
                    f"exited {process.returncode} before serving: "
                    f"{server.stderr_tail.decode(errors='replace').strip()[-300:]}"
                )
            try:
                _, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise ServerError(
                        f"not listening on port {port} within {timeout:.0f} s"
                    ) from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield server
    finally:
        await server.stop()


def free_port() -> int:
    """A port free right now, for a server that cannot pick its own and say which."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sserelay-bench-"))
