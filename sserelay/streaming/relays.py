"""Relays: turn an upstream body, read by read, into Frames for the client, metered.

Each relay follows the decoder convention: `decode(chunk)` takes one upstream
read and returns the Frames to write now (everything that read completed, in
one flush); `flush()` at the end of the body returns the tokens and events of a
trailing piece whose bytes were already written (its `payload` is empty).

- `EventRelay`: `text/event-stream`. Each event is re-encoded field by field
  (event, id, retry, data kept), comments dropped unless asked for; the meter
  reads the event's data as a provider payload.
- `LineRelay`: any other streaming body (NDJSON, chunked text). Bytes pass
  unchanged; JSON lines are metered once complete, plain text as it arrives.
- `BodyRelay`: a whole JSON answer (or an error body). Bytes pass unchanged;
  the answer is metered once complete.

A provider's deltas are fragments of one text: their tokens are counted over
the joined text (a word split across two deltas is one token). A raw payload
is a whole chunk, as `sserelay serve` sends lines: it is counted on its own.
A relay never does I/O.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

from sserelay.errors import UpstreamError
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.payloads import Delta, PayloadMeter, Usage
from sserelay.streaming.stream import Frames
from sserelay.wire.chunking import LineSplitter
from sserelay.wire.sse import Event, encode_event

#: Largest whole JSON answer read for metering; a bigger one passes through unmetered.
MAX_METERED_BODY = 16 * 1024 * 1024

# An SSE field name as servers write one (RFC 9110 token characters). WHATWG §9.2.6 would
# ignore any other line; a gateway calls it what it is: the upstream is not speaking SSE.
_FIELD_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class EventRelay:
    """An upstream SSE body, event by event (WHATWG HTML §9.2 "Server-sent events").

    `strip_usage` drops OpenAI's extra usage chunk (no choices, only `usage`),
    which the proxy asked for on the client's behalf; it is still metered as
    upstream usage. `failure` is set when the upstream broke SSE: the Frames
    returned hold everything before the break and nothing after it."""

    def __init__(
        self,
        payload: PayloadMeter,
        tokenizer: Tokenizer,
        *,
        keep_comments: bool = False,
        strip_usage: bool = False,
    ) -> None:
        self.payload = payload
        self._tokens = _TextMeter(payload, tokenizer)
        self._keep_comments = keep_comments
        self._strip_usage = strip_usage
        self._lines = LineSplitter()
        self._first_line = True
        self.failure: UpstreamError | None = None
        self.stripped = 0
        # The event being read: its fields and comments, until a blank line dispatches it.
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._lines.invalid_utf8_bytes

    def decode(self, chunk: bytes) -> Frames:
        if self.failure is not None:
            return Frames(b"", 0, 0)
        parts: list[bytes] = []
        events = tokens = 0
        for line in self._lines.decode(chunk):
            if self._first_line:
                self._first_line = False
                line = line.removeprefix("\ufeff")  # §9.2.5: one leading BOM is ignored
            if line:
                if not self._field(line):
                    break
                continue
            # §9.2.6: a blank line dispatches the event.
            wire, dispatched, counted = self._dispatch()
            if wire:
                parts.append(wire)
            events += dispatched
            tokens += counted
        return Frames(b"".join(parts), events, tokens)

    def flush(self) -> Frames:
        """End of body. An event left without its blank line is a broken stream
        (§9.2.6 would discard it silently; the bill says the upstream failed)."""
        rest = [line for line in self._lines.flush() if line]
        if self.failure is None and (rest or self._data):
            self.failure = UpstreamError("upstream SSE stream ended in the middle of an event")
        return Frames(b"", 0, 0)

    def _field(self, line: str) -> bool:
        """Take one non-blank line; False (and `failure` set) if it is not SSE."""
        if line[0] == ":":  # a comment
            if self._keep_comments:
                self._comments.append(line)
            return True
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":  # one leading space is stripped
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:  # an id with NUL is ignored
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit() and len(value) <= 4000:
                self._retry = int(value)
        elif not _FIELD_NAME.fullmatch(name):
            shown = line if len(line) <= 60 else line[:57] + "..."
            self.failure = UpstreamError(f"upstream sent a line that is not SSE: {shown!r}")
            return False
        return True  # any other well-formed field is ignored, as a browser would

    def _dispatch(self) -> tuple[bytes, int, int]:
        """The wire form of the block just ended, the events (0 or 1) and tokens in it."""
        data, event, event_id, retry = self._data, self._event, self._id, self._retry
        comments = self._comments
        self._data, self._event, self._id, self._retry = [], None, None, None
        self._comments = []
        head = "".join(f"{c}\n" for c in comments).encode() if comments else b""
        if not data:
            # No data: nothing is dispatched, but a client still takes the id and retry.
            fields = ""
            if event_id is not None:
                fields += f"id: {event_id}\n"
            if retry is not None:
                fields += f"retry: {retry}\n"
            if not fields and not head:
                return b"", 0, 0
            return head + fields.encode() + b"\n", 0, 0
        text = "\n".join(data)
        delta = self.payload.feed(text, event)
        if self._strip_usage and _is_usage_chunk(delta, text):
            self.stripped += 1
            return head, 0, 0
        tokens = self._tokens.count(delta)
        wire = encode_event(Event(text, event, event_id, retry))
        return head + wire, 1, tokens


def _is_usage_chunk(delta: Delta, data: str) -> bool:
    """OpenAI's include_usage chunk: usage and an empty `choices` list."""
    if delta.usage is None or delta.text:
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == []


class _TextMeter:
    """Tokens in each delta: over the joined text for a provider's fragments,
    on its own for a raw payload (the payload meter has not found a provider)."""

    def __init__(self, payload: PayloadMeter, tokenizer: Tokenizer) -> None:
        self._payload = payload
        self._count = tokenizer.count
        self._counter = tokenizer.counter()

    def count(self, delta: Delta) -> int:
        if not delta.text:
            return 0
        if self._payload.kind in ("raw", "auto"):
            return self._count(delta.text)
        return self._counter.feed(delta.text)


class LineRelay:
    """A streaming body that is not SSE. Every chunk is written unchanged.

    With `text` (a `text/*` body metered as raw text), tokens are counted as the
    text arrives; otherwise each complete line is a payload (NDJSON) and its
    tokens go with the chunk that completes it. `events` counts lines, or chunks
    of text."""

    def __init__(self, payload: PayloadMeter, tokenizer: Tokenizer, *, text: bool) -> None:
        self.payload = payload
        self._counter = tokenizer.counter()
        self._tokens = _TextMeter(payload, tokenizer)
        self._text = text
        self._lines = LineSplitter()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.failure: UpstreamError | None = None

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._lines.invalid_utf8_bytes

    def decode(self, chunk: bytes) -> Frames:
        if self._text:
            text = self._utf8.decode(chunk)
            return Frames(chunk, 1, self._counter.feed(text) if text else 0)
        return Frames(chunk, *self._meter(self._lines.decode(chunk)))

    def flush(self) -> Frames:
        if self._text:
            text = self._utf8.decode(b"", final=True)
            return Frames(b"", 0, self._counter.feed(text) if text else 0)
        return Frames(b"", *self._meter(self._lines.flush()))

    def _meter(self, lines: list[str]) -> tuple[int, int]:
        events = tokens = 0
        for line in lines:
            events += 1
            tokens += self._tokens.count(self.payload.feed(line))
        return events, tokens


class BodyRelay:
    """A whole (non-streaming) answer: written unchanged as it arrives, metered
    once complete from its text and its `usage`. With `meter` false (an error
    body) nothing is metered, but the body is kept for the error message."""

    def __init__(self, payload: PayloadMeter, tokenizer: Tokenizer, *, meter: bool = True) -> None:
        self.payload = payload
        self._tokens = _TextMeter(payload, tokenizer)
        self._meter = meter
        self._body: list[bytes] = []
        self._size = 0
        self.failure: UpstreamError | None = None

    @property
    def invalid_utf8_bytes(self) -> int:
        return 0

    def decode(self, chunk: bytes) -> Frames:
        self._size += len(chunk)
        if self._size <= MAX_METERED_BODY:
            self._body.append(chunk)
        return Frames(chunk, 0, 0)

    def flush(self) -> Frames:
        if not self._meter or self._size > MAX_METERED_BODY:
            return Frames(b"", 0, 0)
        try:
            value = json.loads(b"".join(self._body))
        except (ValueError, RecursionError):
            return Frames(b"", 0, 0)  # not JSON after all: passed through, nothing to meter
        # A JSON array is a stream sent whole (Gemini's streamGenerateContent without alt=sse).
        answers = value if isinstance(value, list) else [value]
        tokens = 0
        for answer in answers:
            if isinstance(answer, dict):
                tokens += self._tokens.count(self._read(answer))
        return Frames(b"", 1, tokens)

    def _read(self, answer: dict[str, Any]) -> Delta:
        whole = whole_answer(answer)
        if whole is None:  # the same shape as a stream's payload (Ollama, Gemini)
            return self.payload.feed(json.dumps(answer))
        if whole.usage is not None:
            usage = self.payload.usage
            self.payload.usage = whole.usage if usage is None else usage.merged(whole.usage)
        if whole.model is not None:
            self.payload.model = whole.model
        return whole

    @property
    def text(self) -> str:
        """The body kept so far, as text (for an error message)."""
        return b"".join(self._body).decode("utf-8", errors="replace")


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if value >= 0 else None


def _usage(report: object, keys: tuple[str, str, str]) -> Usage | None:
    if not isinstance(report, dict):
        return None
    usage = Usage(*(_count(report.get(key)) for key in keys))
    return None if usage == Usage(None, None, None) else usage


def _texts(items: object, kind: str, key: str = "text") -> list[str]:
    if not isinstance(items, list):
        return []
    return [
        item[key]
        for item in items
        if isinstance(item, dict) and item.get("type") == kind and isinstance(item.get(key), str)
    ]


def whole_answer(answer: dict[str, Any]) -> Delta | None:
    """The text, usage and model of a non-streaming answer of OpenAI Chat
    Completions (`choices[].message`), OpenAI Responses (`object: response`)
    or Anthropic Messages (`type: message`); None for any other shape.

    sserelay.providers.payloads reads stream payloads; these whole answers are their
    non-streaming counterparts and are read here."""
    model = answer.get("model") if isinstance(answer.get("model"), str) else None
    choices = answer.get("choices")
    if isinstance(choices, list) and any(
        isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices
    ):
        text = "".join(
            c["message"]["content"]
            for c in choices
            if isinstance(c, dict)
            and isinstance(c.get("message"), dict)
            and isinstance(c["message"].get("content"), str)
        )
        usage = _usage(answer.get("usage"), ("prompt_tokens", "completion_tokens", "total_tokens"))
        return Delta(text, usage, model)
    if answer.get("object") == "response":
        outputs = answer.get("output")
        parts: list[str] = []
        if isinstance(outputs, list):
            for output in outputs:
                if isinstance(output, dict) and output.get("type") == "message":
                    parts += _texts(output.get("content"), "output_text")
        usage = _usage(answer.get("usage"), ("input_tokens", "output_tokens", "total_tokens"))
        return Delta("".join(parts), usage, model)
    if answer.get("type") == "message" and isinstance(answer.get("content"), list):
        text = "".join(_texts(answer.get("content"), "text"))
        usage = _usage(answer.get("usage"), ("input_tokens", "output_tokens", "total_tokens"))
        return Delta(text, usage, model)
    return None
