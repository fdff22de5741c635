"""Chunk sources: read a file or stdin without blocking the event loop.

A source is read only while someone iterates it, so a pipe's producer is held
back by the pipe rather than drained into memory. Pipes, sockets and ttys are
read through the event loop (cancellable at once); regular files, which the
loop cannot poll, are read in a worker thread, where a read never blocks for long.

Every source has the shape of `Source`: `batches()` yields the chunks that
became ready together. A recorded source (a replay with its original timing)
yields TimedBatch values instead, each saying when it was sent; the hub's
pacer (`--realtime`) waits accordingly, and treats plain batches as untimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from sserelay.errors import SourceError
from sserelay.wire.chunking import splitter_for

READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class TimedBatch:
    """Chunks that a recording says were sent `at` seconds after it began."""

    at: float
    chunks: Sequence[str]


Batch = Sequence[str] | TimedBatch


class Source(Protocol):
    """Where the chunks come from. `batches()` may be iterated once; closing
    the iterator stops the reading. `timed` says whether its batches are
    TimedBatch values (a recording) that `--realtime` can replay."""

    name: str
    timed: bool

    @property
    def invalid_utf8_bytes(self) -> int: ...

    def batches(self) -> AsyncIterator[Batch]: ...


class TextSource:
    """The text of a file, a pipe, a FIFO or stdin (`path` None or "-"), split by
    `chunk`: one chunk per `line` (the default), per `word`, or per `raw` read.

    An async context manager: entering opens the path (SourceError if it cannot be,
    so a missing file is an error before the server starts), leaving closes it.
    `batches()` yields the chunks each read completed."""

    timed = False

    def __init__(self, path: str | None = None, chunk: str = "line") -> None:
        self.name = "stdin" if path in (None, "-") else str(path)
        self._path = path
        self._splitter = splitter_for(chunk)
        self._file: BinaryIO | None = None
        self._regular = False

    async def __aenter__(self) -> TextSource:
        self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        """Open the path now (it does not block, not even on a FIFO with no writer)."""
        path = self._path
        if self.name == "stdin" and sys.stdin is None:  # started with fd 0 closed (`<&-`)
            raise SourceError("cannot read stdin: it is closed (give a SOURCE, or pipe one in)")
        try:
            if path in (None, "-"):
                self._file = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
            else:
                # O_NONBLOCK: a FIFO with no writer yet opens at once instead of waiting
                # for one (reads start only when a client asks, through the event loop).
                fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK)
                try:
                    os.set_blocking(fd, True)
                    self._file = open(fd, "rb", buffering=0)
                except OSError:  # a directory: open() refuses it, leaving `fd` to us
                    os.close(fd)
                    raise
            mode = os.fstat(self._file.fileno()).st_mode
        except OSError as exc:
            self.close()
            raise SourceError(f"cannot open {self.name}: {exc.strerror or exc}") from exc
        if stat.S_ISDIR(mode):
            self.close()
            raise SourceError(f"cannot read {self.name}: is a directory")
        self._regular = stat.S_ISREG(mode)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def _fd(self) -> int:
        if self._file is None:
            raise SourceError(f"{self.name} is not open")
        return self._file.fileno()

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._splitter.invalid_utf8_bytes

    @property
    def rereadable(self) -> bool:
        """Whether opening the path again reads the same text from the start: a regular
        file, not stdin, a pipe, a FIFO or a device (which give their text once)."""
        return self._regular and self.name != "stdin"

    async def batches(self) -> AsyncIterator[list[str]]:
        reads = self._thread_reads() if self._regular else self._loop_reads()
        try:
            async for data in reads:
                chunks = self._splitter.decode(data)
                if chunks:
                    yield chunks
            last = self._splitter.flush()
            if last:
                yield last
        finally:
            await reads.aclose()

    async def _thread_reads(self) -> AsyncGenerator[bytes, None]:
        fd = self._fd
        while True:
            try:
                data = await asyncio.to_thread(os.read, fd, READ_SIZE)
            except OSError as exc:
                raise SourceError(f"cannot read {self.name}: {exc.strerror or exc}") from exc
            if not data:
                return
            yield data

    async def _loop_reads(self) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE)
        fd = self._fd
        was_blocking = os.get_blocking(fd)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), self._file
            )
        except (OSError, ValueError):
            # Not pollable (e.g. /dev/null under epoll): fall back to thread reads.
            async for data in self._thread_reads():
                yield data
            return
        try:
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError as exc:
                    raise SourceError(f"cannot read {self.name}: {exc.strerror or exc}") from exc
                if not data:
                    return
                yield data
        finally:
            transport.close()
            # A tty is shared with the shell: give it back in blocking mode.
            with contextlib.suppress(OSError):
                os.set_blocking(fd, was_blocking)
