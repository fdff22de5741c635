"""The recorder of `sserelay proxy --record FILE`: every exchange, written as it is relayed.

Each request that reaches the upstream is an exchange of the cassette (format version 2,
sserelay.record.format): its opening line once the upstream's status and headers are in,
then each write's lines the moment the client has them (one unbuffered `write`: a crash
of sserelay loses nothing already relayed; the lines are not fsync'ed, so a power cut
may), then its end. A request sserelay answered itself (refused, too large, an upstream
that could not be reached) is no exchange: nothing upstream answered it.

Secrets never reach the file: every configured one is masked in the path, the header
values and the body's bytes before they are written.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Callable, Sequence

from sserelay.errors import ConfigError, OutputError, RecordingError
from sserelay.record.format import (
    Exchange,
    body_sha256,
    end_line,
    file_line,
    kept_headers,
    record_lines,
)
from sserelay.record.reading import read_recording
from sserelay.secrecy import Redactor

#: How `Recorder` treats a file that exists: refuse it, overwrite it, or add to it.
RECORD_MODES = ("new", "overwrite", "append")
#: The largest cassette `append` reads to find where to go on.
MAX_APPEND_BYTES = 256 * 1024 * 1024


class Recorder:
    """Writes every exchange of a run to the cassette at `path`, opened now.

    `mode` says what to do with a file that exists: `new` refuses it (ConfigError naming
    it; the CLI's `--force` and `--append` say otherwise), `overwrite` truncates it,
    `append` adds exchanges after the ones it holds (numbered on from its last; a last
    line a crash cut short is dropped, as a reader drops it). Appending to something that
    is not a version 2 cassette is a ConfigError; an OSError opening it an OutputError.

    A write that fails (a full disk) stops the recording, never the relay: `error` then
    says why."""

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        redactor: Redactor | None = None,
        mode: str = "new",
    ) -> None:
        if mode not in RECORD_MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.path = path
        #: Masks every configured secret in what is written.
        self.redactor = redactor or Redactor()
        #: Times of an exchange are counted on it.
        self.clock = clock
        self.error: str | None = None
        #: The number of the last exchange in the file (those it held, when appending).
        self.last_number = 0
        #: Exchanges this run began.
        self.exchanges = 0
        #: Exchanges left out, and why (an answer no reader would take back).
        self.unrecorded: list[str] = []
        try:
            self._file, fresh = self._open(mode)
        except FileExistsError:
            raise ConfigError(
                f"{path} exists: give --force to overwrite it or --append to add to it", "record"
            ) from None
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        #: The number of exchanges the file held before this run.
        self.held = self.last_number
        if fresh:
            self.write_line(file_line())

    def _open(self, mode: str) -> tuple[io.FileIO, bool]:
        """The file, open for writing (unbuffered), and whether it needs its first line."""
        if mode == "new":
            return open(self.path, "xb", buffering=0), True  # closed by close()
        if mode == "overwrite":
            return open(self.path, "wb", buffering=0), True
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return open(self.path, "xb", buffering=0), True
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            # Nothing to read back (a pipe would be consumed): it starts a cassette.
            return open(self.path, "ab", buffering=0), True
        self.last_number = self._cassette_end()
        return open(self.path, "ab", buffering=0), False

    def _cassette_end(self) -> int:
        """Check the file is a cassette to add to, drop a last line cut short, and return
        its last exchange's number."""
        with open(self.path, "rb") as file:
            raw = file.read(MAX_APPEND_BYTES + 1)
        if len(raw) > MAX_APPEND_BYTES:
            raise ConfigError(
                f"cannot append to {self.path}: over {MAX_APPEND_BYTES} bytes", "record"
            )
        whole = raw[: raw.rfind(b"\n") + 1]
        try:
            recording = read_recording(whole.decode("utf-8").splitlines(keepends=True))
        except (RecordingError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot append to {self.path}: {exc}", "record") from None
        if recording.version != 2:
            raise ConfigError(
                f"cannot append to {self.path}: it is a version {recording.version} recording "
                "(--force overwrites it)",
                "record",
            )
        if len(whole) < len(raw):
            os.truncate(self.path, len(whole))
        return max((exchange.number for exchange in recording.exchanges), default=0)

    def exchange(self, method: str, path: str) -> ExchangeRecorder:
        """A request has arrived: the recorder of its exchange, its times counted from now.
        Nothing is written until the upstream answers (ExchangeRecorder.start())."""
        return ExchangeRecorder(self, method, self.redactor.redact(path), self.clock())

    def next_number(self) -> int:
        """The number of the exchange that begins now."""
        self.last_number += 1
        self.exchanges += 1
        return self.last_number

    def write_line(self, text: str) -> None:
        """Hand `text` (whole lines) to the operating system now, in one write."""
        if self.error is not None or self._file.closed:
            return
        try:
            self._file.write(text.encode())
        except OSError as exc:
            self.error = f"cannot write the recording {self.path}: {exc.strerror or exc}"

    def close(self) -> None:
        self._file.close()


class ExchangeRecorder:
    """The recorder of one exchange: `start()` when the upstream's answer begins, `write()`
    each write the client took, `end()` when the answer is over."""

    def __init__(self, recorder: Recorder, method: str, path: str, started_at: float) -> None:
        self._recorder = recorder
        self._method = method
        self._path = path
        self._started_at = started_at
        self._sse = False
        self._ended = False
        #: Its number in the cassette, once started.
        self.number: int | None = None

    def _now(self) -> float:
        return self._recorder.clock() - self._started_at

    def start(self, body: bytes, status: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """The upstream answered `status` with `headers` (as relayed) the request that sent
        `body` (as its client sent it): write the exchange's opening line."""
        redact = self._recorder.redactor.redact
        pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]
        try:
            exchange = Exchange(
                self._recorder.last_number + 1,
                self._method,
                self._path,
                body_sha256(body),
                status,
                tuple((name, redact(value)) for name, value in kept_headers(pairs)),
                t=self._now(),
            )
        except ValueError as exc:  # what no reader would take back: skip it, never the relay
            self._recorder.unrecorded.append(f"{self._method} {self._path}: {exc}")
            return
        self.number = self._recorder.next_number()
        self._sse = exchange.sse
        self._recorder.write_line(exchange.opening_line())

    def write(self, payload: bytes) -> None:
        """Record one write to the client, just flushed."""
        if self.number is None or not payload:
            return
        # Masked before the lines are made: JSON escaping or base64 cannot hide a secret.
        payload = self._recorder.redactor.redact_bytes(payload)
        lines = record_lines(self._now(), payload, sse=self._sse, exchange=self.number)
        self._recorder.write_line(lines)

    def end(self, *, complete: bool) -> None:
        """The answer is over: whole (`complete`) or cut. Once; nothing if never started."""
        if self.number is None or self._ended:
            return
        self._ended = True
        end = "complete" if complete else "cut"
        self._recorder.write_line(end_line(self.number, self._now(), end))
