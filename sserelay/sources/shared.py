"""The text a mock answers each request with: `FileText` (read anew for each request) and
`SharedText` (stdin, a pipe or a FIFO: read once, kept, given whole to every request).

Each request takes a `Pass` from `open()`: an async iterator of the batches each read made
ready, which it must `aclose()` (closing the file it read, if it opened one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

from sserelay.errors import SourceError
from sserelay.sources.text import Batch


class ChunkSource(Protocol):
    """A chunk source (TextSource, RecordingSource): an async context manager that opens
    what it reads, read once."""

    name: str

    @property
    def invalid_utf8_bytes(self) -> int: ...

    def batches(self) -> AsyncIterator[Batch]: ...

    async def __aenter__(self) -> ChunkSource: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class Pass(Protocol):
    """One request's pass over the text."""

    def __aiter__(self) -> AsyncIterator[Batch]: ...

    async def aclose(self) -> None: ...


class Text(Protocol):
    """The text the mock answers with. `open()` starts a fresh pass over it (a
    SourceError if it cannot, before anything is answered)."""

    @property
    def invalid_utf8_bytes(self) -> int: ...

    async def open(self) -> Pass: ...


class _FilePass:
    """A pass over a source opened for it, closed with it."""

    def __init__(self, source: ChunkSource, done: Callable[[int], None]) -> None:
        self._source = source
        self._batches = aiter(source.batches())
        self._done = done
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Batch]:
        return self._batches

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._batches, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            await self._source.__aexit__(None, None, None)
            self._done(self._source.invalid_utf8_bytes)


class FileText:
    """A file (or a recording), read anew for each request: `source()` makes one."""

    def __init__(self, source: Callable[[], ChunkSource]) -> None:
        self._source = source
        self.invalid_utf8_bytes = 0

    async def open(self) -> Pass:
        # Opened now: a file gone since the start is a SourceError before any answer.
        source = self._source()
        await source.__aenter__()
        return _FilePass(source, self._counted)

    def _counted(self, invalid: int) -> None:
        # Every pass reads the same file: the count is the file's, not a sum.
        self.invalid_utf8_bytes = max(self.invalid_utf8_bytes, invalid)


class SharedText:
    """Text that can be read only once (stdin, a pipe, a FIFO), from an open `source`:
    read to its end from the first request on, and kept: every request gets all of it
    from the start, live while it is still arriving. The whole text stays in memory;
    `aclose()` stops the reading (the source is closed by whoever opened it)."""

    def __init__(self, source: ChunkSource) -> None:
        self._source = source
        self._chunks: list[Batch] = []
        self._done = False
        self._error: SourceError | None = None
        self._grown = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._source.invalid_utf8_bytes

    async def _read(self) -> None:
        batches = aiter(self._source.batches())
        try:
            async for batch in batches:
                self._chunks.append(batch)
                self._wake()
        except SourceError as exc:
            self._error = exc
        finally:
            self._done = True
            self._wake()
            aclose = getattr(batches, "aclose", None)
            if aclose is not None:
                await aclose()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = asyncio.Event()

    async def open(self) -> Pass:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        return self._replay()

    async def _replay(self) -> AsyncGenerator[Batch, None]:
        sent = 0
        while True:
            if sent < len(self._chunks):
                sent += 1
                yield self._chunks[sent - 1]
            elif self._done:
                if self._error is not None:
                    raise self._error
                return
            else:
                await self._grown.wait()

    async def aclose(self) -> None:
        """Stop reading (at shutdown)."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
