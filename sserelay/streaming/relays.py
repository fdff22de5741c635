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

`relay_for()` picks one for an answer by its status and content type, the same for the
proxy and for a replay of what it recorded (so both bill alike).

A provider's deltas are fragments of one text: their tokens are counted over
the joined text (a word split across two deltas is one token). A raw payload
is a whole chunk, as `sserelay serve` sends lines: it is counted on its own.
A relay never does I/O.
"""

from __future__ import annotations

import json
from typing import Any

from sserelay.errors import UpstreamError
from sserelay.metering.tokens import Tokenizer
from sserelay.providers.payloads import Delta, PayloadMeter, is_usage_chunk, whole_answer
from sserelay.wire.chunking import LineSplitter, Utf8Stream
from sserelay.wire.frames import Frames
from sserelay.wire.sse import Block, BlockParser, Event, encode_event

#: Largest whole JSON answer read for metering; a bigger one passes through unmetered.
MAX_METERED_BODY = 16 * 1024 * 1024


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
        self._blocks = BlockParser(keep_comments=keep_comments, strict=True)
        self.failure: UpstreamError | None = None
        self.stripped = 0

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._blocks.invalid_utf8_bytes

    def decode(self, chunk: bytes) -> Frames:
        if self.failure is not None:
            return Frames(b"", 0, 0)
        blocks = self._blocks.data_blocks(chunk)
        if blocks is not None:
            return self._pass_through(chunk, blocks)
        parts: list[bytes] = []
        events = tokens = 0
        for block in self._blocks.decode(chunk):
            wire, dispatched, counted = self._dispatch(block)
            if wire:
                parts.append(wire)
            events += dispatched
            tokens += counted
        if self._blocks.failure is not None:
            line = self._blocks.failure
            shown = line if len(line) <= 60 else line[:57] + "..."
            self.failure = UpstreamError(f"upstream sent a line that is not SSE: {shown!r}")
        return Frames(b"".join(parts), events, tokens, self._tokens.pending())

    def pass_through(self, chunk: bytes) -> Frames | None:
        """decode() for a chunk of whole canonical events only (see BlockParser.data_blocks),
        passed on as it came; None, having read nothing, for any other chunk (then call
        decode()). Such a chunk cannot break the stream: `failure` stays as it was."""
        if self.failure is not None:
            return None
        blocks = self._blocks.data_blocks(chunk)
        if blocks is None:
            return None
        return self._pass_through(chunk, blocks)

    def _pass_through(self, chunk: bytes, blocks: list[tuple[str | None, str]]) -> Frames:
        """decode() for a chunk that re-encodes to itself (BlockParser.data_blocks): metered
        block by block, passed on as it came. Parsing and re-encoding it was ~4 of the
        ~15 us per event of decode() (issue 17: bench/README.md, "capacity")."""
        feed = self.payload.feed
        count = self._tokens.count
        events = tokens = 0
        kept: list[bytes] | None = None  # the blocks passed on, once one is left out
        for i, (event, data) in enumerate(blocks):
            delta = feed(data, event)
            if self._strip_usage and is_usage_chunk(delta, data):
                self.stripped += 1
                if kept is None:
                    kept = [encode_event(Event(d, e)) for e, d in blocks[:i]]
                continue
            tokens += count(delta)
            events += 1
            if kept is not None:
                kept.append(encode_event(Event(data, event)))
        payload = chunk if kept is None else b"".join(kept)
        return Frames(payload, events, tokens, self._tokens.pending())

    def flush(self) -> Frames:
        """End of body. An event left without its blank line is a broken stream
        (§9.2.6 would discard it silently; the bill says the upstream failed)."""
        self._blocks.flush()
        if self.failure is None and self._blocks.unterminated:
            self.failure = UpstreamError("upstream SSE stream ended in the middle of an event")
        return Frames(b"", 0, self._tokens.flush())

    def _dispatch(self, block: Block) -> tuple[bytes, int, int]:
        """The wire form of a block, the events (0 or 1) and tokens in it."""
        head = "".join(f"{c}\n" for c in block.comments).encode() if block.comments else b""
        if block.data is None:
            # No data: nothing is dispatched, but a client still takes the id and retry.
            fields = ""
            if block.id is not None:
                fields += f"id: {block.id}\n"
            if block.retry is not None:
                fields += f"retry: {block.retry}\n"
            if not fields and not head:
                return b"", 0, 0
            return head + fields.encode() + b"\n", 0, 0
        delta = self.payload.feed(block.data, block.event)
        if self._strip_usage and is_usage_chunk(delta, block.data):
            self.stripped += 1
            return head, 0, 0
        tokens = self._tokens.count(delta)
        wire = encode_event(Event(block.data, block.event, block.id, block.retry))
        return head + wire, 1, tokens


class _TextMeter:
    """Tokens in each delta: over the joined text for a provider's fragments,
    on its own for a raw payload (the payload meter has not found a provider).
    A BPE count holds back the joined text's open tail: `pending()` is what it holds,
    `flush()` bills it at the end of the answer."""

    def __init__(self, payload: PayloadMeter, tokenizer: Tokenizer) -> None:
        self._payload = payload
        self._count = tokenizer.count
        self._counter = tokenizer.counter()
        self._holds_back = tokenizer.holds_back

    def count(self, delta: Delta) -> int:
        if not delta.text:
            return 0
        if self._payload.kind in ("raw", "auto"):
            return self._count(delta.text)
        return self._counter.feed(delta.text)

    def pending(self) -> int:
        return self._counter.pending() if self._holds_back else 0

    def flush(self) -> int:
        return self._counter.flush()


class LineRelay:
    """A streaming body that is not SSE. Every chunk is written unchanged.

    With `text` (a `text/*` body metered as raw text), tokens are counted as the
    text arrives; otherwise each complete line is a payload (NDJSON) and its
    tokens go with the chunk that completes it. `events` counts lines, or chunks
    of text."""

    def __init__(self, payload: PayloadMeter, tokenizer: Tokenizer, *, text: bool) -> None:
        self.payload = payload
        self._counter = tokenizer.counter()
        self._holds_back = tokenizer.holds_back
        self._tokens = _TextMeter(payload, tokenizer)
        self._text = text
        self._lines = LineSplitter()
        self._utf8 = Utf8Stream()
        self.failure: UpstreamError | None = None

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._lines.invalid_utf8_bytes + self._utf8.invalid_utf8_bytes

    def decode(self, chunk: bytes) -> Frames:
        if self._text:
            text = self._utf8.decode(chunk)
            tokens = self._counter.feed(text) if text else 0
            return Frames(chunk, 1, tokens, self._counter.pending() if self._holds_back else 0)
        events, tokens = self._meter(self._lines.decode(chunk))
        return Frames(chunk, events, tokens, self._tokens.pending())

    def flush(self) -> Frames:
        if self._text:
            text = self._utf8.flush()
            tokens = self._counter.feed(text) if text else 0
            return Frames(b"", 0, tokens + self._counter.flush())
        events, tokens = self._meter(self._lines.flush())
        return Frames(b"", events, tokens + self._tokens.flush())

    def _meter(self, lines: list[str]) -> tuple[int, int]:
        events = tokens = 0
        for line in lines:
            events += 1
            tokens += self._tokens.count(self.payload.feed(line))
        return events, tokens


class BodyRelay:
    """A whole (non-streaming) answer: written unchanged as it arrives, metered
    once complete from its text and its `usage`. With `meter` false (an error
    body) nothing is metered, but the body is kept for the error message.

    With `hold` (a key's budget must pass the answer before the client gets any of it),
    the body is held back and written whole by `flush()`, with its tokens, in one Frames;
    a body over MAX_METERED_BODY is let through unheld (and unmetered) once it is over."""

    def __init__(
        self, payload: PayloadMeter, tokenizer: Tokenizer, *, meter: bool = True, hold: bool = False
    ) -> None:
        self.payload = payload
        self._tokens = _TextMeter(payload, tokenizer)
        self._meter = meter
        self._hold = hold
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
            if self._hold:
                return Frames(b"", 0, 0)
        elif self._hold:  # too big to hold: what was held goes now, the rest as it comes
            self._hold = False
            return Frames(b"".join(self._body) + chunk, 0, 0)
        return Frames(chunk, 0, 0)

    def flush(self) -> Frames:
        held = b"".join(self._body) if self._hold else b""
        if not self._meter or self._size > MAX_METERED_BODY:
            return Frames(held, 0, 0)
        try:
            value = json.loads(b"".join(self._body))
        except (ValueError, RecursionError):
            return Frames(held, 0, 0)  # not JSON after all: passed through, nothing to meter
        # A JSON array is a stream sent whole (Gemini's streamGenerateContent without alt=sse).
        answers = value if isinstance(value, list) else [value]
        tokens = 0
        for answer in answers:
            if isinstance(answer, dict):
                tokens += self._tokens.count(self._read(answer))
        return Frames(held, 1, tokens + self._tokens.flush())

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


Relay = EventRelay | LineRelay | BodyRelay


def relay_for(
    content_type: str,
    status: int,
    payload: PayloadMeter,
    tokenizer: Tokenizer,
    *,
    keep_comments: bool = False,
    strip_usage: bool = False,
    text: bool = True,
    hold: bool = False,
) -> Relay:
    """The relay for an answer of `status` whose media type is `content_type`: an error
    body (kept for its message, not metered), SSE, a whole JSON answer, or any other
    stream; with `text`, a `text/*` stream is metered as the raw text it is."""
    if status >= 400:
        return BodyRelay(payload, tokenizer, meter=False)
    if content_type == "text/event-stream":
        return EventRelay(payload, tokenizer, keep_comments=keep_comments, strip_usage=strip_usage)
    if content_type == "application/json" or content_type.endswith("+json"):
        return BodyRelay(payload, tokenizer, hold=hold)
    return LineRelay(payload, tokenizer, text=text and content_type.startswith("text/"))
