"""A recording (sserelay.record.format) as a chunk source: `sserelay serve FILE.jsonl`.

A file whose first line is a recording's header is replayed instead of read as
text. Each recorded part becomes one chunk, in a TimedBatch that says when it
was written, so `--realtime` replays the recorded timing (and `--rate` or
`--delay` pace it anew); without them it goes as fast as clients take it.

Two views of the same recording:
- as events (`serve`): each SSE event's data, or each write of another body;
- as text (`serve --as PROVIDER`): the text inside each provider payload
  (OpenAI, Responses, Anthropic, Ollama, Gemini, or plain), or a `text/*`
  body's text as it was written, so a recording of one provider can be
  replayed in another's format.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator

from sserelay.errors import RecordingError, SourceError
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.payloads import PayloadMeter
from sserelay.record.format import Block, Recording, is_recording, read_recording
from sserelay.sources.text import TimedBatch
from sserelay.wire.chunking import LineSplitter, Utf8Stream

#: A recording is read whole at the start; a bigger file is refused rather than half-read.
MAX_RECORDING_BYTES = 256 * 1024 * 1024


def looks_like_recording(path: str) -> bool:
    """Whether `path` is a regular file whose first line is a recording's header.

    Nothing else is opened here (a pipe, a FIFO, `/dev/fd/N` of `<(...)`, a
    device): reading its first line would consume it, and opening a FIFO waits
    for a writer. Such a source is text."""
    if path in ("", "-"):
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as file:
            first = file.readline(64 * 1024)
    except OSError:
        return False  # the text source reports it
    return is_recording(first)


class RecordingSource:
    """The parts of the recording at `path`, read and checked now (SourceError
    with the line at fault). With `as_text`, the text inside each payload."""

    timed = True
    invalid_utf8_bytes = 0
    #: A recording is read whole at the start, and can be replayed again.
    rereadable = True

    async def __aenter__(self) -> RecordingSource:
        return self  # read whole (and closed) when it was made

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    def __init__(self, path: str, *, as_text: bool = False) -> None:
        self.name = path
        self.as_text = as_text
        try:
            with open(path, "rb") as file:
                raw = file.read(MAX_RECORDING_BYTES + 1)
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
        if len(raw) > MAX_RECORDING_BYTES:
            raise SourceError(f"cannot replay {path}: over {MAX_RECORDING_BYTES} bytes")
        try:
            self.recording: Recording = read_recording(
                raw.decode("utf-8").splitlines(keepends=True)
            )
        except (RecordingError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot replay {path}: {exc}") from exc
        self._chunks = self._texts() if as_text else self._events()

    @property
    def payloads(self) -> str:
        """How the replayed events hold the provider's payloads, as the proxy read the body:
        'lines' for a stream that is neither SSE, text nor JSON (NDJSON: a payload per line,
        and a line may end in a later event), else 'events' (each event's data is one)."""
        kind = self.recording.header.content_type
        if kind.startswith("text/") or kind == "application/json" or kind.endswith("+json"):
            return "events"
        return "lines"

    def _events(self) -> list[TimedBatch]:
        out = []
        for part in self.recording.parts:
            if isinstance(part, Block):
                if part.data is not None:  # a block with only an id or comments carries nothing
                    out.append(TimedBatch(part.t, [part.data]))
            else:
                out.append(TimedBatch(part.t, [part.body.decode("utf-8", errors="replace")]))
        return out

    def _texts(self) -> list[TimedBatch]:
        payload = PayloadMeter()
        lines = LineSplitter()
        # A text/* body is the text itself, line ends and all, as the proxy metered it; a
        # character cut in two by a write is whole.
        kind = self.recording.header.content_type
        plain = kind.startswith("text/") and not self.recording.header.sse
        utf8 = Utf8Stream()
        out = []
        for part in self.recording.parts:
            if isinstance(part, Block):
                if part.data is None:
                    continue
                texts = [payload.feed(part.data, part.event).text]
            elif plain:
                texts = [utf8.decode(part.body)]
            else:  # NDJSON and the like: a payload per line, whichever write completes it
                texts = [payload.feed(line).text for line in lines.decode(part.body)]
            texts = [text for text in texts if text]
            if texts:
                out.append(TimedBatch(part.t, texts))
        # A last line with no line end is whole once the body ends: it goes with the last write.
        rest = [text for line in lines.flush() if (text := payload.feed(line).text)]
        if plain and (text := utf8.flush()):
            rest.append(text)
        if rest:
            at = self.recording.parts[-1].t
            if out and out[-1].at == at:
                out[-1] = TimedBatch(at, [*out[-1].chunks, *rest])
            else:
                out.append(TimedBatch(at, rest))
        return out

    async def batches(self) -> AsyncIterator[TimedBatch]:
        for batch in self._chunks:
            yield batch


class ReplayText:
    """The text inside each replayed event, which the bill counts: what sserelay.providers.payloads
    finds in each payload, its format detected as the proxy detects it. `payloads` is the
    recording's (`RecordingSource.payloads`); with 'lines', a line is read once its line
    end arrives, and a last line with none is read by `flush()` at the end of the stream."""

    def __init__(self, payloads: str) -> None:
        self.payload = PayloadMeter()
        self._lines = LineSplitter() if payloads == "lines" else None

    def feed(self, data: str) -> str:
        """The text in the event whose data is `data`."""
        if self._lines is None:
            return self.payload.feed(data).text
        # The data is decoded text already: encoding it again gives back the same text.
        lines = self._lines.decode(data.encode())
        return "".join(self.payload.feed(line).text for line in lines)

    def flush(self) -> str:
        """End of stream: the text in a last line that had no line end ('' if none)."""
        if self._lines is None:
            return ""
        return "".join(self.payload.feed(line).text for line in self._lines.flush())


class ReplayCount:
    """Tokens of replayed events, counted over the joined text inside their payloads (as
    the proxy metered them, and /ui counts them). `flush()` at the end of the stream
    counts a last NDJSON line with no line end."""

    def __init__(self, tokenizer: Tokenizer, payloads: str) -> None:
        self._text = ReplayText(payloads)
        self._counter = tokenizer.counter()

    def feed(self, data: str) -> int:
        return self._counter.feed(self._text.feed(data))

    def pending(self) -> int:
        return self._counter.pending()

    def flush(self) -> int:
        return self._counter.feed(self._text.flush()) + self._counter.flush()
