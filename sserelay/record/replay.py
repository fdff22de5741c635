"""Replaying a recording (sserelay.record.format): as a chunk source, and request by request.

A file whose first line is a recording's header is replayed instead of read as text.

- `serve FILE` broadcasts a recording of one exchange (RecordingSource): each recorded
  part becomes one chunk, in a TimedBatch that says when it was written, so `--realtime`
  replays the recorded timing (and `--rate` or `--delay` pace it anew); without them it
  goes as fast as clients take it.
- `serve FILE --as PROVIDER` answers each completion request with the text of the
  recorded exchange that matches it (ExchangeSource with `as_text`): the text inside each
  provider payload (OpenAI, Responses, Anthropic, Ollama, Gemini, or plain) or whole JSON
  answer, or a `text/*` body's text as it was written, so a recording of one provider can
  be replayed in another's format.
- `serve FILE --as recorded` answers each request with the matching exchange's own status,
  headers and bytes (sserelay.http.replay_app).

`Cassette` decides which exchange answers which request.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator, Sequence

from sserelay.errors import ConfigError, RecordingError, SourceError
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.payloads import PayloadMeter, whole_answer
from sserelay.record.format import Block, Exchange, Recording, is_recording
from sserelay.record.reading import read_recording
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


def load_recording(path: str) -> Recording:
    """The recording at `path`, read whole and checked now: SourceError (with the line at
    fault) if it cannot be read or is not a recording."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_RECORDING_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_RECORDING_BYTES:
        raise SourceError(f"cannot replay {path}: over {MAX_RECORDING_BYTES} bytes")
    try:
        return read_recording(raw.decode("utf-8").splitlines(keepends=True))
    except (RecordingError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot replay {path}: {exc}") from exc


class Cassette:
    """The exchanges of a recording, each handed to the request that matches it.

    `match()` answers a request with the first exchange that has its method, path and body
    hash, not replayed yet if there is one, else again (a client's retry, an app run twice:
    the same request gets the same answer). Only a request no exchange has recorded falls
    back to order: the first exchange not replayed yet with its method and path (the same
    call asked anew: a new timestamp in the prompt), then the first not replayed yet at all
    (a recording of another API, replayed through another format). Nothing left: None. A
    cassette of one exchange answers every request with it (as a recording of one answer
    always has). Order is the exchanges' order: the order their answers began."""

    def __init__(self, exchanges: Sequence[Exchange]) -> None:
        self.exchanges = tuple(exchanges)
        self._unused = list(self.exchanges)

    def __len__(self) -> int:
        return len(self.exchanges)

    def match(self, method: str, path: str, body_sha256: str) -> Exchange | None:
        """The exchange that answers this request (now replayed), or None."""
        if len(self.exchanges) == 1:
            return self.exchanges[0]

        def same_call(exchange: Exchange) -> bool:
            return exchange.method == method and exchange.path == path

        def same(exchange: Exchange) -> bool:
            return same_call(exchange) and exchange.body_sha256 == body_sha256

        for rule, among in (
            (same, self._unused),
            (same, self.exchanges),
            (same_call, self._unused),
            (None, self._unused),
        ):
            for exchange in among:
                if rule is None or rule(exchange):
                    if exchange in self._unused:
                        self._unused.remove(exchange)
                    return exchange
        return None

    @classmethod
    def of_answers(cls, recording: Recording) -> Cassette:
        """The exchanges that can answer a mock's completion requests (`serve --as
        PROVIDER`): the POST ones, since the mock answers `GET /v1/models` itself; a
        recording of one exchange is that exchange, whatever it was."""
        if len(recording.exchanges) == 1:
            return cls(recording.exchanges)
        return cls([exchange for exchange in recording.exchanges if exchange.method == "POST"])


def no_match_message(method: str, path: str, body_sha256: str) -> str:
    """What a request no recorded exchange answers is told."""
    return f"no recorded exchange for {method} {path} (body sha256 {body_sha256})"


#: What ExchangeSource replays when a recording holds no exchange at all.
_NOTHING = Exchange(1, "GET", "/", None, 200, (("content-type", "text/event-stream"),))


class ExchangeSource:
    """The parts of one recorded exchange as a chunk source; with `as_text`, the text
    inside each payload."""

    timed = True
    invalid_utf8_bytes = 0
    #: A recording is read whole at the start, and can be replayed again.
    rereadable = True

    def __init__(self, exchange: Exchange, *, as_text: bool = False, name: str = "") -> None:
        self.name = name
        self.exchange = exchange
        self.as_text = as_text
        self._chunks = self._texts() if as_text else self._events()

    async def __aenter__(self) -> ExchangeSource:
        return self  # read whole when it was made

    async def __aexit__(self, *exc_info: object) -> None:
        pass

    @property
    def payloads(self) -> str:
        """How the replayed events hold the provider's payloads, as the proxy read the body:
        'lines' for a stream that is neither SSE, text nor JSON (NDJSON: a payload per line,
        and a line may end in a later event), else 'events' (each event's data is one)."""
        kind = self.exchange.content_type
        if kind.startswith("text/") or kind == "application/json" or kind.endswith("+json"):
            return "events"
        return "lines"

    def _events(self) -> list[TimedBatch]:
        out = []
        for part in self.exchange.parts:
            if isinstance(part, Block):
                if part.data is not None:  # a block with only an id or comments carries nothing
                    out.append(TimedBatch(part.t, [part.data]))
            else:
                out.append(TimedBatch(part.t, [part.body.decode("utf-8", errors="replace")]))
        return out

    def _texts(self) -> list[TimedBatch]:
        kind = self.exchange.content_type
        if not self.exchange.sse and (kind == "application/json" or kind.endswith("+json")):
            return self._whole_texts()
        payload = PayloadMeter()
        lines = LineSplitter()
        # A text/* body is the text itself, line ends and all, as the proxy metered it; a
        # character cut in two by a write is whole.
        kind = self.exchange.content_type
        plain = kind.startswith("text/") and not self.exchange.sse
        utf8 = Utf8Stream()
        out = []
        for part in self.exchange.parts:
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
            at = self.exchange.parts[-1].t
            if out and out[-1].at == at:
                out[-1] = TimedBatch(at, [*out[-1].chunks, *rest])
            else:
                out.append(TimedBatch(at, rest))
        return out

    def _whole_texts(self) -> list[TimedBatch]:
        """The text of a whole JSON answer (`stream: false`), read as the proxy meters it,
        once its last write is in."""
        parts = self.exchange.parts
        try:
            value = json.loads(b"".join(part.wire() for part in parts))
        except (ValueError, RecursionError):
            return []
        payload = PayloadMeter()
        texts = []
        # A JSON array is a stream sent whole (Gemini's streamGenerateContent without alt=sse).
        for answer in value if isinstance(value, list) else [value]:
            if isinstance(answer, dict):
                whole = whole_answer(answer)  # None: a stream payload's shape (Ollama, Gemini)
                texts.append(payload.feed(json.dumps(answer)).text if whole is None else whole.text)
        texts = [text for text in texts if text]
        return [TimedBatch(parts[-1].t, texts)] if texts else []

    async def batches(self) -> AsyncIterator[TimedBatch]:
        for batch in self._chunks:
            yield batch


class RecordingSource(ExchangeSource):
    """The recording at `path` (read and checked now: SourceError with the line at fault)
    as a chunk source: `serve FILE` broadcasts its one exchange. A recording of several
    exchanges is a ConfigError: one stream cannot answer several requests."""

    def __init__(self, path: str, *, as_text: bool = False) -> None:
        self.recording = load_recording(path)
        exchanges = self.recording.exchanges
        if len(exchanges) > 1:
            raise ConfigError(
                f"{path} holds {len(exchanges)} recorded exchanges and serve broadcasts one "
                "stream: answer each request with its own with --as recorded (or --as PROVIDER)",
                "source",
            )
        super().__init__(exchanges[0] if exchanges else _NOTHING, as_text=as_text, name=path)


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
