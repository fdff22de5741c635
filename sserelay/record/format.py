"""Recordings (cassettes): every exchange of a proxy run, with the time of each write, as
JSON Lines: pure.

`sserelay proxy --record FILE` writes one; `sserelay serve FILE` replays it. The first
line says the format's version; every later line belongs to one exchange (a request and
its answer), named by its number. Requests overlap, so exchanges interleave: each part is
written the moment its client has it (a crash loses nothing already relayed), rather
than each exchange whole at its end.

    {"sserelay_recording": 2}
    {"exchange": 1, "t": 0.18, "method": "POST", "path": "/v1/chat/completions",
     "body_sha256": "5f0c...", "status": 200, "headers": [["content-type", "text/event-stream"]]}
    {"exchange": 1, "t": 0.2031, "event": null, "id": null, "retry": null, "data": "{...}"}
    {"exchange": 2, "t": 0.01, "method": "GET", "path": "/v1/models", ...}
    {"exchange": 2, "t": 0.012, "chunk": "{\\"object\\": \\"list\\", ...}"}
    {"exchange": 2, "t": 0.013, "end": "complete"}
    {"exchange": 1, "t": 0.2519, "event": null, "id": null, "retry": null, "data": "[DONE]"}
    {"exchange": 1, "t": 0.2522, "end": "complete"}

- The opening line of an exchange is written when the answer's status and headers are in:
  the request's method, its path (never the query: keys travel there), `body_sha256`
  (body_sha256(): the SHA-256, hex, of the request body, canonical if it is JSON), the
  status, and the response headers worth replaying (kept_headers()). Exchanges are
  numbered from 1 in the order their answers began.
- A part is one SSE event (`data`, lines joined by `\\n`, null for a block with no data;
  `event`, `id`, `retry`, and `comments` when comments were kept; `Block.wire()` gives
  back the exact bytes) or one write of another body (`chunk`, or `chunk_base64` when the
  bytes are not UTF-8 text on their own).
- The end line says how the answer ended for its client: `complete` (all of it was
  relayed) or `cut` (the client left, the upstream failed, the run stopped). An exchange
  without one was cut by a crash, or is still being recorded.
- `t` is seconds since the exchange's request arrived.

Version 1 (one exchange per file, before cassettes) is still read: its header line
`{"sserelay_recording": 1, "method": ..., "path": ..., "status": ..., "content_type": ...}`
is followed by that exchange's parts, without exchange numbers. `sserelay_recording` is
the format's version; a reader refuses one it does not know.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sserelay.wire.sse import BlockParser, Event, encode_event

#: The version this module writes.
VERSION = 2
#: The versions it reads.
READABLE_VERSIONS = (1, 2)
#: How an exchange ended for its client (its end line).
ENDS = ("complete", "cut")
#: `serve RECORDING --as recorded`: replay a recording's exchanges as they were recorded.
AS_RECORDED = "recorded"

#: Response headers never recorded nor replayed: the transport's own (the replaying server
#: frames the body and dates it itself) and those that carry credentials or a session.
UNRECORDED_HEADERS = frozenset(
    {
        "authorization",
        "connection",
        "content-length",
        "cookie",
        "date",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "server",
        "set-cookie",
        "set-cookie2",
        "transfer-encoding",
        "www-authenticate",
    }
)
#: The largest body hashed as canonical JSON: parsing holds the event loop (about 10 ms a
#: MiB), and every stream waits meanwhile. A bigger body (images) is hashed raw.
CANONICAL_LIMIT = 4 * 1024 * 1024
# RFC 9110 §5.1: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def body_sha256(body: bytes) -> str:
    """The SHA-256 (hex) a recording names a request body by. A body that parses as JSON is
    hashed canonical (keys sorted, no whitespace, non-ASCII as \\u escapes), so the same
    request sent by another client or SDK version, keys in another order, matches; any
    other body (empty, form data, not UTF-8), or one over CANONICAL_LIMIT bytes, is hashed
    as its raw bytes."""
    if len(body) > CANONICAL_LIMIT:
        return hashlib.sha256(body).hexdigest()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return hashlib.sha256(body).hexdigest()
    try:
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (ValueError, RecursionError):  # nested too deep to write back
        return hashlib.sha256(body).hexdigest()
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def kept_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The response headers worth recording and replaying: all but UNRECORDED_HEADERS,
    names lower-cased, order and repeats kept."""
    return tuple(
        (name.lower(), value) for name, value in headers if name.lower() not in UNRECORDED_HEADERS
    )


def media_type(value: str) -> str:
    """A content type's media type, lower-cased, without parameters (`text/event-stream`)."""
    return value.partition(";")[0].strip().lower()


@dataclass(frozen=True, slots=True)
class Header:
    """A version 1 recording's first line: what was asked, and what kind of answer came.
    Still read (as one exchange); written only to make version 1 files (tests)."""

    method: str
    path: str
    status: int
    content_type: str

    @property
    def sse(self) -> bool:
        return self.content_type == "text/event-stream"

    def line(self) -> str:
        return _line(
            {
                "sserelay_recording": 1,
                "method": self.method,
                "path": self.path,
                "status": self.status,
                "content_type": self.content_type,
            }
        )


@dataclass(frozen=True, slots=True)
class Block:
    """One SSE block as written, `t` seconds after the request arrived."""

    t: float
    data: str | None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Event("", self.event, self.id, self.retry)  # the same rules: no line end in event or id
        for comment in self.comments:
            if not comment.startswith(":") or "\n" in comment or "\r" in comment:
                raise ValueError(f"not a comment line: {comment!r}")

    def wire(self) -> bytes:
        """The exact bytes the block was written as."""
        head = "".join(f"{comment}\n" for comment in self.comments).encode()
        if self.data is not None:
            return head + encode_event(Event(self.data, self.event, self.id, self.retry))
        fields = ""
        if self.id is not None:
            fields += f"id: {self.id}\n"
        if self.retry is not None:
            fields += f"retry: {self.retry}\n"
        return head + fields.encode() + b"\n"

    def line(self, exchange: int | None = None) -> str:
        """The block's line, in `exchange` (None: a version 1 line, with no number)."""
        record: dict[str, Any] = _numbered(exchange)
        record |= {
            "t": round(self.t, 6),
            "event": self.event,
            "id": self.id,
            "retry": self.retry,
            "data": self.data,
        }
        if self.comments:
            record["comments"] = list(self.comments)
        return _line(record)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One write of a body that is not SSE, `t` seconds after the request arrived."""

    t: float
    body: bytes

    def wire(self) -> bytes:
        return self.body

    def line(self, exchange: int | None = None) -> str:
        """The write's line, in `exchange` (None: a version 1 line, with no number)."""
        record = _numbered(exchange)
        record["t"] = round(self.t, 6)
        try:
            record["chunk"] = self.body.decode()
        except UnicodeDecodeError:  # e.g. a character cut in two by the read
            record["chunk_base64"] = base64.b64encode(self.body).decode()
        return _line(record)


Part = Block | Chunk


@dataclass(frozen=True, slots=True)
class Exchange:
    """One recorded request and its answer. `t` is when the answer's status and headers
    came (seconds after the request arrived); `end` how it ended for its client (ENDS), None
    if the recording does not say (a crash cut it short)."""

    number: int
    method: str
    path: str
    #: body_sha256() of the request body; None if not recorded (a version 1 recording)
    body_sha256: str | None
    status: int
    #: (name, value) pairs, names lower case
    headers: tuple[tuple[str, str], ...]
    t: float = 0.0
    parts: tuple[Part, ...] = ()
    end: str | None = None
    #: when the answer ended (seconds after the request arrived), with `end`
    ended_at: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.number, bool) or not isinstance(self.number, int) or self.number < 1:
            raise ValueError(f"the exchange number must be a whole number from 1: {self.number!r}")
        if not _TOKEN.fullmatch(self.method):
            raise ValueError(f"not a request method: {self.method!r}")
        if self.body_sha256 is not None and not _SHA256.fullmatch(self.body_sha256):
            raise ValueError("'body_sha256' must be 64 lower-case hex digits")
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise ValueError(f"not an HTTP status: {self.status!r}")
        if not 100 <= self.status <= 999:  # RFC 9110 §15: three digits
            raise ValueError(f"not an HTTP status: {self.status!r}")
        for name, value in self.headers:
            # Replayed as they are: a line end would inject a header.
            if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"not a response header: {name!r}")
        if self.end is not None and self.end not in ENDS:
            raise ValueError(f"'end' must be one of {', '.join(ENDS)}: {self.end!r}")

    @property
    def content_type(self) -> str:
        """The answer's media type (`text/event-stream`), '' if it had none."""
        for name, value in self.headers:
            if name == "content-type":
                return media_type(value)
        return ""

    @property
    def sse(self) -> bool:
        return self.content_type == "text/event-stream"

    @property
    def complete(self) -> bool:
        """Whether its client got the whole answer (as far as the recording says)."""
        return self.end == "complete"

    def opening_line(self) -> str:
        """The line that opens the exchange in a recording: everything but its parts."""
        return _line(
            {
                "exchange": self.number,
                "t": round(self.t, 6),
                "method": self.method,
                "path": self.path,
                "body_sha256": self.body_sha256,
                "status": self.status,
                "headers": [list(pair) for pair in self.headers],
            }
        )


@dataclass(frozen=True, slots=True)
class Recording:
    """A recording as read: its format version and its exchanges, by number."""

    version: int
    exchanges: tuple[Exchange, ...]


def file_line() -> str:
    """A recording's first line."""
    return _line({"sserelay_recording": VERSION})


def end_line(exchange: int, t: float, end: str) -> str:
    """The line that ends `exchange` (`end` one of ENDS), `t` seconds in."""
    if end not in ENDS:
        raise ValueError(f"not an end: {end!r}")
    return _line({"exchange": exchange, "t": round(t, 6), "end": end})


def _numbered(exchange: int | None) -> dict[str, Any]:
    return {} if exchange is None else {"exchange": exchange}


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def split_blocks(t: float, payload: bytes) -> list[Block]:
    """The SSE blocks of one write (whole blocks, as sserelay writes them), comments kept."""
    return [
        Block(t, block.data, block.event, block.id, block.retry, block.comments)
        for block in BlockParser(keep_comments=True).decode(payload)
    ]


def record_lines(t: float, payload: bytes, *, sse: bool, exchange: int | None = None) -> str:
    """The lines recording one write of `payload`, `t` seconds in, in `exchange` (None: the
    lines of a version 1 recording)."""
    if sse:
        return "".join(block.line(exchange) for block in split_blocks(t, payload))
    return Chunk(t, payload).line(exchange)


def is_recording(first_line: bytes) -> bool:
    """Whether a file whose first line is `first_line` is a recording (of any version)."""
    try:
        header = json.loads(first_line)
    except (ValueError, RecursionError):
        return False
    return isinstance(header, dict) and "sserelay_recording" in header
