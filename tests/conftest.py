"""Fixtures that start the real `sserelay` CLI as a subprocess on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tests.services import (
    PostgresServer,
    RedisServer,
    ServiceUnavailable,
    skip_or_fail,
    start_postgres,
    start_redis,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tokens.txt"
_SERVING = re.compile(r"sserelay: serving on (http://\S+/)")


@dataclass
class Relay:
    """A running `sserelay` process; stderr is drained by a thread so it never blocks."""

    proc: subprocess.Popen[bytes]
    url: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def feed(self, text: str | bytes) -> None:
        """Write to the relay's stdin and flush, so the line is there now."""
        self.stdin.write(text.encode() if isinstance(text, str) else text)
        self.stdin.flush()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stdout(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode()

    def bill(self, timeout: float = 10.0) -> dict[str, Any]:
        """The JSON bill (the relay must run with --json), once it has exited."""
        code = self.wait(timeout)
        out = self.stdout()
        try:
            bill: dict[str, Any] = json.loads(out)
        except json.JSONDecodeError:
            raise AssertionError(
                f"no JSON bill (exit {code}); stdout {out[-500:]!r}; stderr {self.stderr[-2000:]}"
            ) from None
        return bill

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


def _drain(stream: IO[bytes], lines: list[str], ready: threading.Event, relay: Relay) -> None:
    for raw in stream:
        line = raw.decode(errors="replace")
        lines.append(line)
        match = _SERVING.search(line)
        if match and not relay.url:
            relay.url = match.group(1)
            ready.set()
    ready.set()


def start_relay(
    *args: str,
    stdin: int | IO[Any] | None = subprocess.PIPE,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Relay:
    """Run `python -m sserelay ARGS` (with `--port 0` unless a port is given; before a
    `--`, after which the arguments are a command's)."""
    argv = [sys.executable, "-m", "sserelay", *args]
    if "--port" not in args and not (env and "SSERELAY_PORT" in env):
        at = argv.index("--") if "--" in argv else len(argv)
        argv[at:at] = ["--port", "0"]
    proc = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    relay = Relay(proc)
    ready = threading.Event()
    assert proc.stderr is not None
    threading.Thread(
        target=_drain, args=(proc.stderr, relay.stderr_lines, ready, relay), daemon=True
    ).start()
    if wait_ready:
        ready.wait(timeout=15)
        if not relay.url:
            proc.kill()
            raise AssertionError(f"sserelay did not start: {relay.stderr}")
    return relay


Service = TypeVar("Service", PostgresServer, RedisServer)


def _session_service(start: Callable[[], Service]) -> Iterator[Service]:
    """A private server for the session, removed at its end (skipped if it cannot start,
    failed under CI=true)."""
    try:
        server = start()
    except ServiceUnavailable as exc:
        skip_or_fail(str(exc))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the session (skipped without it, failed under CI=true)."""
    yield from _session_service(start_postgres)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    """One private Redis for the session (skipped without it, failed under CI=true)."""
    yield from _session_service(start_redis)


def usage_report(ledger: str, *args: str) -> dict[str, Any]:
    """`sserelay usage --ledger LEDGER --json ARGS`, which must succeed, as JSON."""
    result = subprocess.run(
        [sys.executable, "-m", "sserelay", "usage", "--ledger", ledger, "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session's Redis, running and empty for each test (a test may stop and start it)."""
    if not redis_session.accepts():
        redis_session.start()
    redis_session.flush()
    yield redis_session
    if not redis_session.accepts():
        redis_session.start()


@pytest.fixture(autouse=True, scope="session")
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`proxy` and `serve --as` keep a ledger in $XDG_STATE_HOME by default: the tests' relays
    (and the in-process runs) keep theirs in a directory of the test run, never the user's."""
    home = tmp_path_factory.mktemp("state")
    # The tests count words unless they say otherwise (proxy and serve --as default to
    # `auto`, OpenAI's BPE, which the tests of that feature ask for by name).
    settings = {"XDG_STATE_HOME": str(home), "SSERELAY_TOKENIZER": "whitespace"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield home
    for name, value in saved.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    """Collects relays started by a test and kills any still running at the end."""
    started: list[Relay] = []
    yield started
    for relay in started:
        if relay.proc.poll() is None:
            relay.proc.send_signal(signal.SIGKILL)
            relay.proc.wait(timeout=5)
        for pipe in (relay.proc.stdin, relay.proc.stdout, relay.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def relay(relays: list[Relay]) -> Iterator[Any]:
    """`relay(*args, **kw)` starts `sserelay ARGS` and returns the running Relay."""

    def start(*args: str, **kwargs: Any) -> Relay:
        started = start_relay(*args, **kwargs)
        relays.append(started)
        return started

    yield start


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


T = TypeVar("T")

#: Long enough for any honest run on a loaded machine, short enough to fail fast.
DEADLINE = 5.0


def run_bounded(coro: Awaitable[T]) -> T:
    """Run `coro` on a fresh loop; one that stalls raises TimeoutError after DEADLINE."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, DEADLINE)

    return asyncio.run(bounded())


def require_tool(*names: str, package: str) -> str:
    """The path of the first of `names` on PATH. Without any, the test is skipped,
    except under CI=true: .ci/run installs the Debian `package`, so there it fails."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    message = f"{names[0]} is not installed (Debian: apt-get install {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; .ci/run must install it", pytrace=False)
    pytest.skip(message)
