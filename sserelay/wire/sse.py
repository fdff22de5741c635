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
    chunks: Sequence[str], first_id: int | None = None
) -> tuple[bytes, tuple[int, ...]]:
    """Frame each chunk as one event (ids counting up from `first_id`, or none)
    and return the joined bytes with each event's end offset in them.

    Exactly `b"".join(encode_data(...))`, made faster for a batch of lines
    without line ends of their own: one format per event and one encode for
    all (the per-event encode was half the cost of relaying an event)."""
    if len(chunks) == 1:
        part = encode_data(chunks[0], None if first_id is None else str(first_id))
        return part, (len(part),)
    if first_id is None:
        texts = [f"data: {chunk}\n\n" for chunk in chunks]
        lines_per_event = 2
    else:
        texts = [f"id: {i}\ndata: {chunk}\n\n" for i, chunk in enumerate(chunks, first_id)]
        lines_per_event = 3
    joined = "".join(texts)
    # No CR and no LF but the framing's: no chunk needs splitting into data lines.
    if "\r" in joined or joined.count("\n") != lines_per_event * len(chunks):
        if first_id is None:
            parts = [encode_data(chunk) for chunk in chunks]
        else:
            parts = [encode_data(chunk, str(i)) for i, chunk in enumerate(chunks, first_id)]
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


class SSEDecoder:
    """Incremental decoder: `decode(chunk)` returns the events completed by
    `chunk`; any split of the byte stream (down to one byte at a time, or a CR
    and its LF in different chunks) yields the same events. `flush()` at end of
    stream returns nothing: §9.2.6 discards an event not ended by a blank line.

    `last_event_id` is the id of the last dispatched event (what a reconnect
    sends); `retry` the last valid reconnection time."""

    def __init__(self) -> None:
        self._lines = LineSplitter()  # §9.2.5's line ends, a CR and its LF in two chunks too
        self._first_line = True
        self._data: list[str] = []
        self._event_type = ""
        self.last_event_id = ""
        self._id_buffer = ""  # §9.2.6: the id field fills a buffer; dispatch publishes it
        self.retry: int | None = None
        self._retry_seen = False  # a retry field since the last dispatch, kept for relays

    def decode(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for line in self._lines.decode(chunk):
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[Event]:
        """End of stream: drop the unterminated last event (§9.2.6) and reset."""
        self._lines.flush()  # a last line without its line end belongs to that event
        self._data = []
        self._event_type = ""
        self._retry_seen = False
        return []

    def _process_line(self, line: str) -> Event | None:
        if self._first_line:
            self._first_line = False
            # §9.2.5: one leading U+FEFF byte order mark is ignored.
            line = line.removeprefix(_BOM)
        if not line:  # a blank line dispatches the event
            return self._dispatch()
        if line.startswith(":"):  # a comment
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):  # one leading space is stripped
            value = value[1:]
        # a line without a colon is a field with that name and an empty value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:  # an id with NUL is ignored
                self._id_buffer = value
        elif name == "retry":
            # Only ASCII digits count. int() refuses over 4,300 digits; so long
            # a value is an attack, not a delay, and is ignored.
            if value.isascii() and value.isdigit() and len(value) <= 4000:
                self.retry = int(value)
                self._retry_seen = True
        return None  # any other field is ignored

    def _dispatch(self) -> Event | None:
        self.last_event_id = self._id_buffer
        data, event_type, retry_seen = self._data, self._event_type, self._retry_seen
        self._data, self._event_type, self._retry_seen = [], "", False
        if not data:  # §9.2.6: an empty data buffer dispatches nothing
            return None
        return Event(
            data="\n".join(data),
            event=event_type or None,
            id=self.last_event_id or None,
            retry=self.retry if retry_seen else None,
        )
