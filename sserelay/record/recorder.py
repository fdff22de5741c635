"""The recorder of `sserelay proxy --record FILE`: one proxied answer, written as it is relayed.

The first request that arrives claims the recording; its answer is written in
the format of sserelay.record.format, each write's lines handed to the operating
system the moment the client has them (one unbuffered `write`): a crash of
sserelay loses nothing already relayed. The lines are not fsync'ed, so a power
cut may. Later requests are relayed as usual, unrecorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sserelay.record.format import Header, record_lines
from sserelay.secrecy import Redactor


class Recorder:
    """Writes one recording to `path` (created or truncated now: an OSError if it cannot be).

    A write that fails (a full disk) stops the recording, never the relay:
    `error` then says why."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        redactor: Redactor | None = None,
    ) -> None:
        self.path = path
        self._redactor = redactor or Redactor()
        self._clock = clock
        self._file = open(path, "wb", buffering=0)  # closed by close()
        self._started_at = 0.0
        self._sse = False
        self.claimed = False
        self.header: Header | None = None
        self.parts = 0
        self.error: str | None = None

    def claim(self) -> bool:
        """Called when a request arrives: True for the one request that is recorded.
        Its times are counted from now."""
        if self.claimed:
            return False
        self.claimed = True
        self._started_at = self._clock()
        return True

    def start(self, header: Header) -> None:
        """The answer's status and headers are in: write the header line."""
        self.header = header
        self._sse = header.sse
        self._write(header.line())

    def write(self, payload: bytes) -> None:
        """Record one write to the client, just flushed."""
        if payload:
            self.parts += 1
            self._write(record_lines(self._clock() - self._started_at, payload, sse=self._sse))

    def _write(self, text: str) -> None:
        if self.error is not None or self._file.closed:
            return
        try:
            # A credential echoed in an answer is never written to disk.
            self._file.write(self._redactor.redact(text).encode())
        except OSError as exc:
            self.error = f"cannot write the recording {self.path}: {exc.strerror or exc}"

    def close(self) -> None:
        self._file.close()
