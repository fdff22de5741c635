"""Sans-IO Server-Sent Events: encode events to bytes, decode bytes to events.

Follows the WHATWG HTML Living Standard, section 9.2 "Server-sent events"
(https://html.spec.whatwg.org/multipage/server-sent-events.html). Nothing here
does I/O: feed bytes in, get events out; hand an event in, get bytes out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from sserelay.wire.chunking import LineSplitter

# §9.2.5: lines end in CRLF, a lone LF or a lone CR; nothing else ends a line.
_LINE_END = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event. `data` may hold any text, newlines included; the encoder
    turns each of its lines into a `data:` line. `event` and `id` may not hold
    a line end (that would inject a field), and `id` may not hold NUL (§9.2.6
    ignores such an id). `retry` is milliseconds."""

    data: str = ""
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        for name in ("event", "id"):
            value = getattr(self, name)
            if value is not None and ("\n" in value or "\r" in value):
                raise ValueError(f"SSE {name} may not contain a line end: {value!r}")
        if self.id is not None and "\0" in self.id:
            raise ValueError("SSE id may not contain NUL")
        if self.retry is not None and self.retry < 0:
            raise ValueError("SSE retry must be a non-negative number of milliseconds")


def encode_data(data: str, event_id: str | None = None) -> bytes:
    """Frame `data` as one event with an optional id: the per-event hot path.

    A line end of any kind inside `data` starts a new `data:` line of the same
    event, so a chunk can never end its event early or inject a field."""
    if "\n" in data or "\r" in data:
        body = "\ndata: ".join(_LINE_END.split(data))
    else:
        body = data
    if event_id is None:
        return f"data: {body}\n\n".encode()
    return f"id: {event_id}\ndata: {body}\n\n".encode()


def encode_batch(
    chunks: Sequence[str], first_id: int | None = None, id_prefix: str = ""
) -> tuple[bytes, tuple[int, ...]]:
    """Frame each chunk as one event (ids counting up from `first_id`, or none)
    and return the joined bytes with each event's end offset in them.
    `id_prefix` goes before each id's number (`"1700000000000-"` makes Redis stream ids);
    it must hold no line end.

    Exactly `b"".join(encode_data(...))`, made faster for a batch of lines
    without line ends of their own: one format per event and one encode for
    all (the per-event encode was half the cost of relaying an event)."""
    if len(chunks) == 1:
        part = encode_data(chunks[0], None if first_id is None else f"{id_prefix}{first_id}")
        return part, (len(part),)
    if first_id is None:
        texts = [f"data: {chunk}\n\n" for chunk in chunks]
        lines_per_event = 2
    elif not id_prefix:
        texts = [f"id: {i}\ndata: {chunk}\n\n" for i, chunk in enumerate(chunks, first_id)]
        lines_per_event = 3
    else:  # apart, so plain numbers pay nothing for it
        texts = [
            f"id: {id_prefix}{i}\ndata: {chunk}\n\n" for i, chunk in enumerate(chunks, first_id)
        ]
        lines_per_event = 3
    joined = "".join(texts)
    # No CR and no LF but the framing's: no chunk needs splitting into data lines.
    if "\r" in joined or joined.count("\n") != lines_per_event * len(chunks):
        if first_id is None:
            parts = [encode_data(chunk) for chunk in chunks]
        else:
            parts = [
                encode_data(chunk, f"{id_prefix}{i}") for i, chunk in enumerate(chunks, first_id)
            ]
        return b"".join(parts), tuple(accumulate(map(len, parts)))
    payload = joined.encode()
    if len(payload) == len(joined):  # ASCII: a str's length is its byte length
        return payload, tuple(accumulate(map(len, texts)))
    return payload, tuple(accumulate(len(text.encode()) for text in texts))


def encode_event(event: Event) -> bytes:
    """Serialize `event` to its wire form, ending with the blank line that dispatches it."""
    head = ""
    if event.event is not None:
        head += f"event: {event.event}\n"
    if event.id is not None:
        head += f"id: {event.id}\n"
    if event.retry is not None:
        head += f"retry: {event.retry}\n"
    return head.encode() + encode_data(event.data)


def encode_comment(text: str = "") -> bytes:
    """A comment line (ignored by clients); `: ping` keeps idle connections alive."""
    lines = _LINE_END.split(text)
    return "".join(f": {line}\n" if line else ":\n" for line in lines).encode()


# An SSE field name as servers write one (RFC 9110 token characters). WHATWG §9.2.6 would
# ignore any other line; a strict reader (a gateway) calls it what it is: not SSE.
_FIELD_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True)
class Block:
    """One SSE block as written, up to the blank line that ends it: its `data` lines joined
    by `\\n` (None when it has no data field), its last `event` and `retry`, its `id` field
    (None when it has none; an id holding NUL is ignored, §9.2.6) and, where kept, its
    comment lines (with their colon)."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: tuple[str, ...] = ()


class BlockParser:
    """The one SSE field parser (§9.2.5 lines, §9.2.6 fields), block by block.

    `decode(chunk)` returns the blocks that `chunk` completes; any split of the byte stream
    gives the same blocks. `flush()` at the end of the stream returns nothing and says, with
    `unterminated`, whether data was left without its blank line. With `strict`, a line
    that is neither a comment nor a well-formed field stops the parse: `failure` holds the
    line and every later byte is ignored. Comments are kept in their block with
    `keep_comments`. `invalid_utf8_bytes` counts bytes replaced with U+FFFD."""

    def __init__(self, *, keep_comments: bool = False, strict: bool = False) -> None:
        self._lines = LineSplitter()  # §9.2.5's line ends, a CR and its LF in two chunks too
        self._keep_comments = keep_comments
        self._strict = strict
        self._first_line = True
        self.failure: str | None = None
        self.unterminated = False
        self._reset()

    def _reset(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []
        self._open = False  # a field or comment was read since the last blank line

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._lines.invalid_utf8_bytes

    def decode(self, chunk: bytes) -> list[Block]:
        if self.failure is not None:
            return []
        blocks: list[Block] = []
        for line in self._lines.decode(chunk):
            if self._first_line:
                self._first_line = False
                line = line.removeprefix(_BOM)  # §9.2.5: one leading BOM is ignored
            if line:
                if not self._field(line):
                    break
            elif self._open:  # §9.2.6: a blank line dispatches the block
                blocks.append(self._block())
        return blocks

    def data_blocks(self, chunk: bytes) -> list[tuple[str | None, str]] | None:
        """decode()'s fast path, for a chunk of whole blocks written exactly as
        `encode_event` writes an event with no id or retry: an optional `event: NAME` line
        (NAME not empty), then `data: ` lines, then one blank line, LF line ends only,
        valid UTF-8, at a block boundary (nothing held from earlier chunks, no BOM).

        Returns each block's (event, data), as decode() would read them, and the parser
        moves past the chunk; re-encoding those blocks gives `chunk` back byte for byte,
        so a relay may pass it on as it came. Returns None, having read nothing, for any
        other chunk (then call decode()). Streamed answers (OpenAI's, Anthropic's,
        Gemini's) arrive this way, a block or a few per read."""
        if (
            self._open
            or self._lines.pending
            or self.failure is not None
            or not chunk.endswith(b"\n\n")
            or chunk.startswith(b"\n")
            or b"\r" in chunk
            or b"\n\n\n" in chunk
        ):
            return None
        try:
            text = chunk.decode()
        except UnicodeDecodeError:
            return None
        if self._first_line and text.startswith(_BOM):
            return None
        blocks: list[tuple[str | None, str]] = []
        for block in text[:-2].split("\n\n"):
            if block.startswith("data: "):
                if "\n" not in block:  # one data line: the rule
                    blocks.append((None, block[6:]))
                    continue
                event = None
                lines = block.split("\n")
            elif block.startswith("event: "):
                event, _, rest = block.partition("\n")
                event = event[7:]
                if not event or not rest:
                    return None  # an empty name is no name; no data dispatches nothing
                lines = rest.split("\n")
            else:
                return None
            data = []
            for line in lines:
                if not line.startswith("data: "):
                    return None
                data.append(line[6:])
            blocks.append((event, "\n".join(data)))
        self._first_line = False
        return blocks

    def flush(self) -> list[Block]:
        """End of stream: §9.2.6 discards a block not ended by a blank line. `unterminated`
        says whether that block held data (or a last line had no line end)."""
        rest = [line for line in self._lines.flush() if line]
        self.unterminated = self.failure is None and bool(rest or self._data)
        self._reset()
        return []

    def _field(self, line: str) -> bool:
        """Take one non-blank line; False (and `failure` set) if a strict parse meets non-SSE."""
        self._open = True
        if line[0] == ":":  # a comment
            if self._keep_comments:
                self._comments.append(line)
            return True
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":  # one leading space is stripped
            value = value[1:]
        # A line without a colon is a field with that name and an empty value.
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:  # an id with NUL is ignored
                self._id = value
        elif name == "retry":
            # Only ASCII digits count. int() refuses over 4,300 digits; so long
            # a value is an attack, not a delay, and is ignored.
            if value.isascii() and value.isdigit() and len(value) <= 4000:
                self._retry = int(value)
        elif self._strict and not _FIELD_NAME.fullmatch(name):
            self.failure = line
            return False
        return True  # any other field is ignored, as a browser would

    def _block(self) -> Block:
        block = Block(
            "\n".join(self._data) if self._data else None,
            self._event,
            self._id,
            self._retry,
            tuple(self._comments),
        )
        self._reset()
        return block


class SSEDecoder:
    """Incremental decoder: `decode(chunk)` returns the events completed by
    `chunk`; any split of the byte stream (down to one byte at a time, or a CR
    and its LF in different chunks) yields the same events. `flush()` at end of
    stream returns nothing: §9.2.6 discards an event not ended by a blank line.

    `last_event_id` is the id of the last dispatched event (what a reconnect
    sends); `retry` the last valid reconnection time."""

    def __init__(self) -> None:
        self._blocks = BlockParser()
        self.last_event_id = ""
        self.retry: int | None = None

    def decode(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for block in self._blocks.decode(chunk):
            event = self._dispatch(block)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[Event]:
        """End of stream: drop the unterminated last event (§9.2.6) and reset."""
        self._blocks.flush()
        return []

    def _dispatch(self, block: Block) -> Event | None:
        # §9.2.6: the id field fills the last event ID buffer, which every dispatch
        # publishes, data or not; an empty id resets it.
        if block.id is not None:
            self.last_event_id = block.id
        if block.retry is not None:
            self.retry = block.retry
        if block.data is None:  # §9.2.6: an empty data buffer dispatches nothing
            return None
        return Event(
            data=block.data,
            event=block.event,
            id=self.last_event_id or None,
            retry=block.retry,
        )
