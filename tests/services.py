"""Real services for tests, each started privately: a free loopback port, a temp directory,
an unprivileged user when the tests run as root, stopped by its own pid.

The shape is meant for every server the suite needs (PostgreSQL, Redis):

    binary = find_binary("redis-server", package="redis-server")   # skip, or fail if CI=true
    process = ServiceProcess([str(binary), "--port", str(port)], workdir)
    process.start(); process.wait_ready(probe); ...; process.stop()

Nothing here imports pytest at module level, so bench/ scripts can start the same servers.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn

#: Long enough for initdb on a loaded 2-core machine, short enough to fail fast.
START_DEADLINE = 60.0


class ServiceUnavailable(Exception):
    """A service's binary is missing: skip (or, under CI=true, fail) the tests that need it."""


def skip_or_fail(message: str) -> NoReturn:
    """Skip the test, except under CI=true, where .ci/run installs what is missing: fail."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; .ci/run must install it", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_binary(name: str, *, package: str, patterns: Sequence[str] = ()) -> Path:
    """`name` on PATH, else the newest match of `patterns` (globs, for binaries Debian keeps
    off PATH such as /usr/lib/postgresql/*/bin). Raises ServiceUnavailable naming the
    Debian package."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for pattern in patterns:
        matches = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        if matches:
            return Path(matches[0])
    raise ServiceUnavailable(f"{name} is not installed (Debian: apt-get install {package})")


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in path.split("/") if part.isdigit())


@dataclass(frozen=True)
class RunAs:
    """Who a service runs as: when the tests run as root, `nobody` (PostgreSQL refuses to
    run as root, and a test server has no business with root's rights); else the caller."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def unprivileged(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls()
        nobody = pwd.getpwnam("nobody")
        return cls(nobody.pw_uid, nobody.pw_gid)

    def own(self, path: Path) -> None:
        """Hand `path` (a directory made by the tests) to the service's user."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def popen_args(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        # setuid in the child itself (no runuser/su in between): the pid we hold is the
        # server's own, so stopping it by pid stops the server
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def make_workdir(prefix: str, run_as: RunAs) -> Path:
    """A private temp directory the service's user owns. Not under pytest's tmp_path: that
    is root's 0700 tree, which `nobody` cannot enter."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    run_as.own(workdir)
    return workdir


@dataclass
class ServiceProcess:
    """One server process, its output in `workdir/NAME.log`."""

    argv: list[str]
    workdir: Path
    run_as: RunAs = field(default_factory=RunAs)
    name: str = "service"
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.process = subprocess.Popen(  # type: ignore[call-overload]
            self.argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for pytest must not reach it first
            **self.run_as.popen_args(),
        )

    def wait_ready(self, probe: Callable[[], bool], deadline: float = START_DEADLINE) -> None:
        """Poll `probe` until it is true; raise with the log's tail if the process exits or
        the deadline passes."""
        until = time.monotonic() + deadline
        while not probe():
            if not self.running:
                raise RuntimeError(f"{self.name} exited during start:\n{self.log_tail()}")
            if time.monotonic() > until:
                raise RuntimeError(f"{self.name} not ready in {deadline} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send `signum` to the pid, wait for it to exit, SIGKILL it after `timeout`."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signum)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster: `initdb` in a temp directory, `postgres` on a free
    loopback port with its unix socket in that directory, trust auth for the superuser
    `sserelay`. Not durable unless asked (fsync off): it is for tests, which need speed."""

    bindir: Path
    workdir: Path
    port: int
    run_as: RunAs
    durable: bool = False
    service: ServiceProcess | None = None

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        auth = "sserelay" if password is None else f"sserelay:{password}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def initdb(self) -> None:
        subprocess.run(  # type: ignore[call-overload]
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "sserelay",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=self.workdir,
            check=True,
            capture_output=True,
            timeout=START_DEADLINE,
            **self.run_as.popen_args(),
        )

    def start(self) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.workdir),
            "max_connections": "40",
            "shared_buffers": "16MB",
        }
        if not self.durable:
            # fsync off loses data only to an OS crash; synchronous_commit stays on, or a
            # crash() (immediate shutdown) would lose the last commits, which a test of a
            # server lost mid-run must be able to count on
            settings |= {"fsync": "off", "full_page_writes": "off"}
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self.service = ServiceProcess(argv, self.workdir, self.run_as, name="postgres")
        self.service.start()
        self.service.wait_ready(self.accepts)

    def accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are ended, the cluster is left clean."""
        if self.service is not None:
            self.service.stop(signal.SIGINT)

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): every connection drops at once and the next start
        runs crash recovery, as after a server killed mid-run."""
        if self.service is not None:
            self.service.stop(signal.SIGQUIT)

    def create_database(self, name: str) -> str:
        """A fresh database `name`; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres(*, durable: bool = False) -> PostgresServer:
    """initdb + start a private PostgreSQL. Raises ServiceUnavailable without the Debian
    package `postgresql` or without psycopg."""
    initdb = find_binary(
        "initdb", package="postgresql", patterns=["/usr/lib/postgresql/*/bin/initdb"]
    )
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise ServiceUnavailable(
            "psycopg is not installed (pip install 'sserelay[postgres]')"
        ) from exc
    run_as = RunAs.unprivileged()
    workdir = make_workdir("sserelay-pg-", run_as)
    server = PostgresServer(initdb.parent, workdir, free_port(), run_as, durable=durable)
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


@dataclass
class RedisServer:
    """A private Redis: Debian's `redis-server` on a free loopback port, its working directory
    a temp directory, nothing saved (`--save '' --appendonly no`). `stop()` and `start()`
    again on the same port model a Redis lost and back (empty: it keeps nothing)."""

    binary: Path
    workdir: Path
    port: int
    service: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            str(self.binary),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        self.service = ServiceProcess(argv, self.workdir, name="redis")
        self.service.start()
        self.service.wait_ready(self.accepts)

    def accepts(self) -> bool:
        """Whether the server answers PING (a bare RESP exchange: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Run one command and return its raw reply (for tests that poke at the server)."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(request.encode())
            return conn.recv(1 << 20)

    def flush(self) -> None:
        self.command("FLUSHALL")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def kill(self) -> None:
        """SIGKILL: every connection drops at once, as when the server dies."""
        if self.service is not None:
            self.service.stop(signal.SIGKILL)
            self.service = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis() -> RedisServer:
    """Start a private Redis. Raises ServiceUnavailable without the Debian package
    `redis-server`."""
    binary = find_binary("redis-server", package="redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="sserelay-redis-"))
    server = RedisServer(binary, workdir, free_port())
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server
