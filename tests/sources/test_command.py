"""CommandSource: a real command under a real pty, on asyncio's loop and on uvloop (the CLI's)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from sserelay.errors import ConfigError, SourceError
from sserelay.http.config import MockConfig, ServeConfig
from sserelay.sources.command import CommandSource
from tests.conftest import DEADLINE, wait_until

T = TypeVar("T")
PY = sys.executable


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to its end on a fresh loop of the kind; a stall fails at DEADLINE."""

    def run_on(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, DEADLINE)

        if request.param == "uvloop":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(bounded())
        return asyncio.run(bounded())

    return run_on


async def read_all(source: CommandSource) -> list[str]:
    return [chunk async for batch in source.batches() for chunk in batch]


def python(code: str, *args: str) -> list[str]:
    """Python running `code`, buffered as it would be by default (this environment may
    set PYTHONUNBUFFERED, which would hide the buffering a pipe brings)."""
    return ["env", "-u", "PYTHONUNBUFFERED", PY, "-c", code, *args]


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie no one has reaped yet has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_bytes_are_the_programs_own(run: Callable[[Awaitable[list[str]]], list[str]]) -> None:
    # A cooked pty would turn \n into \r\n (OPOST/ONLCR): raw reads show the bytes as written.
    async def raw() -> list[str]:
        async with CommandSource(["printf", "a\\nb\\r\\nc\\td"], chunk="raw") as source:
            return await read_all(source)

    assert "".join(run(raw())) == "a\nb\r\nc\td"


def test_stdout_is_a_line_buffered_terminal_and_stdin_is_dev_null(
    run: Callable[[Awaitable[list[str]]], list[str]],
) -> None:
    code = (
        "import os, sys\n"
        "print(os.isatty(1), sys.stdout.line_buffering, os.isatty(0),"
        " os.path.samestat(os.fstat(0), os.stat(os.devnull)), os.environ['TERM'])\n"
        "print(repr(sys.stdin.read()))"
    )

    async def lines() -> list[str]:
        async with CommandSource(python(code)) as source:
            return await read_all(source)

    assert run(lines()) == ["True True False True dumb", "''"]
    # The same program on a pipe block-buffers: the trap the pty removes.
    piped = subprocess.run(python(code), capture_output=True, text=True, check=True, timeout=10)
    assert piped.stdout.split()[:2] == ["False", "False"]


def test_a_failing_command_gives_its_output_then_its_status_and_last_stderr_line(
    run: Callable[[Awaitable[tuple[list[str], str]]], tuple[list[str], str]],
) -> None:
    code = (
        "import sys\nprint('one')\nprint('two')\n"
        "sys.stderr.write('noise\\nboom: no model\\n')\nsys.exit(3)"
    )

    async def failing() -> tuple[list[str], str]:
        got: list[str] = []
        async with CommandSource(python(code)) as source:
            with pytest.raises(SourceError) as caught:
                async for batch in source.batches():
                    got += batch
            assert source.returncode == 3
        return got, str(caught.value)

    lines, error = run(failing())
    assert lines == ["one", "two"]
    assert error.endswith("exited with status 3: boom: no model")
    assert error.startswith(f"env -u PYTHONUNBUFFERED {PY} -c ") and "\n" not in error


def test_a_command_killed_by_a_signal_it_was_not_sent_by_us_fails(
    run: Callable[[Awaitable[str]], str],
) -> None:
    async def killed() -> str:
        code = "import os\nprint('x')\nos.kill(os.getpid(), 9)"
        async with CommandSource(python(code)) as source:
            with pytest.raises(SourceError) as caught:
                await read_all(source)
        return str(caught.value)

    assert run(killed()).endswith("was killed by SIGKILL")


def test_a_command_that_exits_0_ends_the_stream_cleanly_with_its_last_partial_line(
    run: Callable[[Awaitable[list[str]]], list[str]],
) -> None:
    async def clean() -> list[str]:
        async with CommandSource(["sh", "-c", "echo a; echo b >&2; printf c"]) as source:
            lines = await read_all(source)
            assert source.returncode == 0 and source.stderr_tail == "b\n"
            return lines

    assert run(clean()) == ["a", "c"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sserelay-no-such-command"], "cannot run sserelay-no-such-command: No such file"),
        (["/"], "cannot run /: Permission denied"),
    ],
)
def test_a_command_that_cannot_run_is_a_source_error_at_the_start(
    run: Callable[[Awaitable[None]], None], argv: list[str], message: str
) -> None:
    async def start() -> None:
        with pytest.raises(SourceError, match=message):
            async with CommandSource(argv):
                pass

    run(start())


def test_leaving_stops_the_process_group_children_included(
    run: Callable[[Awaitable[tuple[int, int]]], tuple[int, int]],
) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid)\n"
        "time.sleep(60)"
    )

    async def started() -> tuple[int, int]:
        async with CommandSource(python(code)) as source:
            batches = source.batches()
            (grandchild,) = await anext(batches)
            await batches.aclose()  # the run stops reading it, as the hub does
            assert source.pid is not None
            pids = source.pid, int(grandchild)
        assert source.returncode == -signal.SIGTERM
        return pids

    pids = run(started())
    wait_until(lambda: all(gone(pid) for pid in pids))


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace(
    run: Callable[[Awaitable[float]], float],
) -> None:
    # The leader exits on SIGTERM; its child ignores it and must still go, by SIGKILL.
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time;"
        " signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'])\n"
        "time.sleep(60)"
    )

    async def stop() -> float:
        async with CommandSource(python(code), kill_grace=0.3) as source:
            await anext(aiter(source.batches()))  # the child runs with SIGTERM ignored
            started = time.monotonic()
        return time.monotonic() - started

    assert 0.3 <= run(stop()) < 0.3 + 1.5


def test_a_command_done_before_the_end_leaves_no_wait(
    run: Callable[[Awaitable[float]], float],
) -> None:
    async def stop() -> float:
        async with CommandSource(["echo", "hi"], kill_grace=30) as source:
            await read_all(source)
            started = time.monotonic()
        return time.monotonic() - started

    assert run(stop()) < 1.0


def test_a_fast_producer_read_slowly_loses_nothing_and_a_chatty_stderr_never_blocks_it(
    run: Callable[[Awaitable[list[str]]], list[str]],
) -> None:
    code = (
        "import sys\n"
        "for i in range(50_000):\n"
        "    print(i)\n"
        "    if i % 100 == 0: sys.stderr.write('x' * 1000 + '\\n')\n"
        "sys.stderr.write('last words\\n')"
    )

    async def slow() -> list[str]:
        got: list[str] = []
        async with CommandSource(python(code)) as source:
            async for batch in source.batches():
                got += batch
                if len(got) % 10 == 0:
                    await asyncio.sleep(0)  # let stderr be drained between reads
            assert source.stderr_tail.endswith("last words\n")
        return got

    assert run(slow()) == [str(i) for i in range(50_000)]


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs Linux's /proc")
def test_output_waits_in_the_pty_while_nobody_reads(
    run: Callable[[Awaitable[list[str]]], list[str]], tmp_path: Path
) -> None:
    # Far more than the pty holds (~20 KiB): the producer blocks in its write until read.
    done = tmp_path / "done"
    code = "import sys\nfor i in range(20_000): print(i)\nopen(sys.argv[1], 'w').close()"

    async def held_back() -> list[str]:
        async with CommandSource(python(code, str(done))) as source:
            batches = aiter(source.batches())
            first = await anext(batches)
            pid = source.pid
            assert pid is not None
            await _until(lambda: _blocked(pid))
            assert not done.exists()
            rest = [chunk async for batch in batches for chunk in batch]
        assert done.exists()
        return [*first, *rest]

    assert run(held_back()) == [str(i) for i in range(20_000)]


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def _blocked(pid: int) -> bool:
    """Whether process `pid` sleeps in a system call on its fd 1 (a write to the full pty)."""
    with open(f"/proc/{pid}/stat") as stat:
        state = stat.read().rsplit(")", 1)[1].split()[0]
    with open(f"/proc/{pid}/syscall") as syscall:
        fields = syscall.read().split()  # number, arguments...: "running" while it runs
    return state == "S" and len(fields) > 1 and fields[1] == "0x1"


@pytest.mark.parametrize("kind", [ServeConfig, MockConfig])
def test_a_config_takes_a_command_or_a_source_not_both(kind: type[ServeConfig]) -> None:
    assert kind(command=["echo", "hi"]).command == ("echo", "hi")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both") as both:
        kind(source="file.txt", command=("echo",))
    assert both.value.field == "command"
    with pytest.raises(ConfigError, match="empty"):
        kind(command=("",))


def test_the_source_needs_a_running_loop_only_to_start() -> None:
    source = CommandSource(["true"])
    assert (source.pid, source.returncode, source.name) == (None, None, "true")
    with pytest.raises(ValueError, match="empty"):
        CommandSource([])
