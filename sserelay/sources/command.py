"""A command as the source (`sserelay serve -- CMD ARGS...`): sserelay runs the producer
itself and relays its stdout, websocketd-style.

Its stdout is a pseudo-terminal, so C stdio and Python line-buffer it, where a pipe
would make them block-buffer (the trap websocketd's users hit: its issues #85 and #271).
The pty is raw: no echo and no output post-processing (OPOST off, so `\\n` is not turned
into `\\r\\n`): the bytes relayed are the program's own. Its stdin is /dev/null; its
stderr is a pipe, drained all the time (a chatty stderr never blocks it), the last lines
kept for the error a failure reports. `TERM=dumb` (and `NO_COLOR=1` unless set) tell it
there is no screen to colour.

The pty is read through the event loop, and only while someone iterates `batches()`:
a producer that writes faster than clients read blocks in its write once the pty's
buffer is full, as on a pipe, and nothing is lost. EIO on the master is the end of its
output (Linux: every holder of the pty has closed it), not an error; the exit status
then says how it ended.

It runs in a session of its own (its own process group, no controlling terminal), so
the terminal's Ctrl-C reaches sserelay alone, and it cannot stop on a terminal read.
Leaving the context manager stops the whole group, children included: SIGTERM, then
SIGKILL after `kill_grace` seconds. A process that leaves the group (a daemon that calls
setsid) is beyond reach, as it is for a shell's job control.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Sequence

from sserelay.errors import SourceError
from sserelay.wire.chunking import splitter_for

READ_SIZE = 256 * 1024
#: Seconds between SIGTERM and SIGKILL when the command is stopped.
KILL_GRACE = 2.0
#: Bytes of the command's stderr kept: enough for its last lines.
STDERR_TAIL = 4096
#: The longest command name and stderr line an error quotes.
QUOTE_LIMIT = 200
#: How often the group is looked at while its members (not our children) wind down.
_GROUP_POLL = 0.01


class CommandSource:
    """The stdout of `argv` (a program and its arguments, looked up on PATH), run under
    a pty and split by `chunk` as TextSource splits a file.

    An async context manager: entering starts the command (SourceError if it cannot be
    run, so a missing program is an error before the server starts); leaving stops its
    process group. `batches()` yields the chunks each read completed, ends when the
    command's output ends and it exits with status 0, and raises SourceError naming the
    command, its status and its last stderr line when it exits otherwise (or dies of a
    signal sserelay did not send)."""

    timed = False
    #: its output is given once, like a pipe's
    rereadable = False

    def __init__(
        self, argv: Sequence[str], chunk: str = "line", *, kill_grace: float = KILL_GRACE
    ) -> None:
        if not argv or not argv[0]:
            raise ValueError("the command is empty")
        self.argv = tuple(argv)
        self.name = _quote(shlex.join(self.argv))
        self._splitter = splitter_for(chunk)
        self._kill_grace = kill_grace
        self._process: subprocess.Popen[bytes] | None = None
        self._master = -1
        self._pidfd = -1
        self._stderr = -1
        self._stderr_tail = bytearray()
        self._stderr_drain: asyncio.Task[None] | None = None
        self._signalled = False  # we sent the group a signal: its death is not a failure

    async def __aenter__(self) -> CommandSource:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def pid(self) -> int | None:
        """The command's process id (also its process group's), None before the start."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited and been waited for; minus the signal's
        number if a signal killed it (as subprocess says)."""
        return None if self._process is None else self._process.returncode

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._splitter.invalid_utf8_bytes

    @property
    def stderr_tail(self) -> str:
        """The last few KiB the command wrote to stderr (read so far)."""
        return self._stderr_tail.decode(errors="replace")

    def start(self) -> None:
        """Start the command now, under a fresh raw pty (inside a running event loop)."""
        import tty  # Unix only: imported when a command is run, not with the package

        loop = asyncio.get_running_loop()
        master, slave = os.openpty()  # both non-inheritable: the child gets slave as fd 1
        try:
            tty.setraw(slave)
            env = {**os.environ, "TERM": "dumb"}
            env.setdefault("NO_COLOR", "1")
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=slave,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=env,
            )
        except OSError as exc:
            os.close(master)
            raise SourceError(f"cannot run {_quote(self.argv[0])}: {exc.strerror or exc}") from exc
        except BaseException:  # termios.error is no OSError
            os.close(master)
            raise
        finally:
            os.close(slave)  # the child's copy is the only one: its exit is our EIO
        self._master = master
        os.set_blocking(master, False)
        with contextlib.suppress(AttributeError, OSError):  # pidfds: Linux 5.3+
            self._pidfd = os.pidfd_open(self._process.pid)
        assert self._process.stderr is not None
        self._stderr = self._process.stderr.fileno()
        os.set_blocking(self._stderr, False)
        self._stderr_drain = loop.create_task(self._drain_stderr())

    async def batches(self) -> AsyncGenerator[list[str], None]:
        if self._process is None:
            raise SourceError(f"{self.name} is not running")
        fd = self._master
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                await _readable(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # Linux: the pty's last holder closed it
                    break
                raise SourceError(
                    f"cannot read the output of {self.name}: {exc.strerror or exc}"
                ) from exc
            if not data:  # the BSDs' end of a pty
                break
            chunks = self._splitter.decode(data)
            if chunks:
                yield chunks
        last = self._splitter.flush()
        if last:
            yield last
        failure = self._failure(await self.wait())
        if failure is not None:
            raise SourceError(failure)

    async def wait(self) -> int:
        """Wait until the command has exited; its returncode. What it wrote to stderr
        is then in `stderr_tail`."""
        process = self._running()
        while process.poll() is None:
            await self._exited()
        self._read_stderr()  # an exited command's last words are all in the pipe by now
        return process.returncode

    async def aclose(self) -> None:
        """Stop the command's process group (SIGTERM, SIGKILL after the grace) and
        release the pty; at once if the group is already gone."""
        if self._process is None:
            return
        try:
            await self._stop_group()
        finally:
            await self._release()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise SourceError(f"{self.name} is not running")
        return self._process

    async def _exited(self) -> None:
        """Wait a while for the command to exit (at most until it has)."""
        if self._pidfd >= 0:
            await _readable(self._pidfd)
        else:  # no pidfd: nothing to wait on but time
            await asyncio.sleep(_GROUP_POLL)

    def _failure(self, status: int) -> str | None:
        """The error for a command that ended with `status`, None if it did not fail."""
        if status == 0 or (status < 0 and self._signalled):
            return None
        if status > 0:
            how = f"exited with status {status}"
        else:
            how = f"was killed by {_signal_name(-status)}"
        last = self._last_stderr_line()
        return f"{self.name} {how}" + (f": {last}" if last else "")

    def _last_stderr_line(self) -> str:
        lines = [line.strip() for line in self.stderr_tail.splitlines()]
        lines = [line for line in lines if line]
        return _quote(lines[-1]) if lines else ""

    async def _drain_stderr(self) -> None:
        while self._read_stderr():
            await _readable(self._stderr)

    def _read_stderr(self) -> bool:
        """Read what stderr holds now into the tail; False at its end."""
        while self._stderr >= 0:
            try:
                data = os.read(self._stderr, READ_SIZE)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._stderr_tail += data
            del self._stderr_tail[:-STDERR_TAIL]
        return False

    async def _stop_group(self) -> None:
        process = self._running()
        self._signalled = True
        if not self._signal_group(signal.SIGTERM):
            process.poll()
            return
        deadline = time.monotonic() + self._kill_grace
        try:
            while self._group_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if process.returncode is None and self._pidfd >= 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._exited()
                else:  # the leader is gone; its children are not ours to wait on
                    await asyncio.sleep(_GROUP_POLL)
        finally:
            # Also when cancelled: nothing of the group may outlive the run.
            if self._group_alive():
                self._signal_group(signal.SIGKILL)
            if process.poll() is None:  # it left its group (setpgid): it is still ours
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)  # a SIGKILLed process is gone in a moment

    def _signal_group(self, signum: int) -> bool:
        """Send the group `signum`; False if it has no member we may signal."""
        try:
            os.killpg(self._running().pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _group_alive(self) -> bool:
        # The leader is reaped first: as a zombie it would still count as a member.
        process = self._running()
        process.poll()
        return self._signal_group(0) and _has_live_member(process.pid)

    async def _release(self) -> None:
        drain, self._stderr_drain = self._stderr_drain, None
        if drain is not None:  # ended before its fd is closed: it watches that fd
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        process = self._running()
        if process.stderr is not None:
            process.stderr.close()
        for fd in (self._master, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._master = self._pidfd = self._stderr = -1


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable (or at its end), through the event loop."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _has_live_member(group: int) -> bool:
    """Whether process group `group` has a member that is not a zombie. Orphans are
    reaped by init, which in a container may take its time (or never come): a zombie
    is gone for our purpose. Without Linux's /proc, any member counts."""
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        state, pgrp = fields[0], fields[2]
        if pgrp == str(group).encode() and state not in (b"Z", b"X"):
            return True
    return False


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _quote(text: str) -> str:
    """`text` on one line, at most QUOTE_LIMIT characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."
