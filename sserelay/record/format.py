"""Recordings: an answer as its client got it, with the time of each write, as JSON Lines: pure.

`sserelay proxy --record FILE` writes one; `sserelay serve FILE` replays it. The
first line is the header; every later line is one part of the answer, `t`
seconds after the request arrived:

    {"sserelay_recording": 1, "method": "POST", "path": "/v1/chat/completions",
     "status": 200, "content_type": "text/event-stream"}
    {"t": 0.2031, "event": null, "id": null, "retry": null, "data": "{\\"id\\":...}"}
    {"t": 0.2519, "event": null, "id": null, "retry": null, "data": "[DONE]"}

- An SSE answer has one line per event, as written: `data` (lines joined by
  `\\n`; null for a block with no data, e.g. only an `id`), `event`, `id`,
  `retry`, and `comments` (the `:` lines before it) when comments were kept.
  `Block.wire()` gives back the exact bytes.
- Any other body has one line per write: `{"t": ..., "chunk": TEXT}`, or
  `chunk_base64` when the bytes are not UTF-8 text on their own.

`sserelay_recording` is the format's version; a reader refuses one it does not know.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sserelay.errors import RecordingError
from sserelay.wire.sse import BlockParser, Event, encode_event

#: The version this module writes and reads.
VERSION = 1


@dataclass(frozen=True, slots=True)
class Header:
    """The recording's first line: what was asked, and what kind of answer came."""

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
                "sserelay_recording": VERSION,
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

    def line(self) -> str:
        record: dict[str, Any] = {
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

    def line(self) -> str:
        t = round(self.t, 6)
        try:
            return _line({"t": t, "chunk": self.body.decode()})
        except UnicodeDecodeError:  # e.g. a character cut in two by the read
            return _line({"t": t, "chunk_base64": base64.b64encode(self.body).decode()})


Part = Block | Chunk


@dataclass(frozen=True, slots=True)
class Recording:
    header: Header
    parts: tuple[Part, ...]


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def split_blocks(t: float, payload: bytes) -> list[Block]:
    """The SSE blocks of one write (whole blocks, as sserelay writes them), comments kept."""
    return [
        Block(t, block.data, block.event, block.id, block.retry, block.comments)
        for block in BlockParser(keep_comments=True).decode(payload)
    ]


def record_lines(t: float, payload: bytes, *, sse: bool) -> str:
    """The lines recording one write of `payload`, `t` seconds in."""
    if sse:
        return "".join(block.line() for block in split_blocks(t, payload))
    return Chunk(t, payload).line()


def _text(value: object, where: str, *, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise RecordingError(f"{where}: expected a string")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, from a \\ud800-style escape
        raise RecordingError(f"{where}: not valid Unicode text") from None
    return value


def _part(record: dict[str, Any], where: str) -> Part:
    t = record.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float) or t < 0:
        raise RecordingError(f"{where}: 't' must be a number of seconds")
    if "chunk" in record:
        body = _text(record["chunk"], where, nullable=False)
        assert body is not None
        return Chunk(float(t), body.encode())
    if "chunk_base64" in record:
        try:
            return Chunk(float(t), base64.b64decode(str(record["chunk_base64"]), validate=True))
        except (binascii.Error, ValueError):
            raise RecordingError(f"{where}: 'chunk_base64' is not base64") from None
    retry = record.get("retry")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise RecordingError(f"{where}: 'retry' must be a number of milliseconds")
    comments = record.get("comments", [])
    if not isinstance(comments, list):
        raise RecordingError(f"{where}: 'comments' must be a list")
    try:
        return Block(
            float(t),
            _text(record.get("data"), where),
            _text(record.get("event"), where),
            _text(record.get("id"), where),
            retry,
            tuple(str(_text(c, where, nullable=False)) for c in comments),
        )
    except ValueError as exc:  # Event's own checks: a line end in event or id, NUL in id
        raise RecordingError(f"{where}: {exc}") from None


def is_recording(first_line: bytes) -> bool:
    """Whether a file whose first line is `first_line` is a recording (of any version)."""
    try:
        header = json.loads(first_line)
    except (ValueError, RecursionError):
        return False
    return isinstance(header, dict) and "sserelay_recording" in header


def read_recording(lines: Iterable[str]) -> Recording:
    """Parse a recording; RecordingError (naming the line) if it is not one.

    A last line cut short (the recorder died mid-write) is dropped: everything
    before it was flushed whole."""
    parts: list[Part] = []
    header: Header | None = None
    pending: str | None = None
    for number, text in enumerate(lines, 1):
        if pending is not None:
            raise RecordingError(f"line {number - 1}: not JSON")
        where = f"line {number}"
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            pending = text  # an error unless it is the cut-short last line
            continue
        if not isinstance(record, dict):
            raise RecordingError(f"{where}: expected a JSON object")
        if header is None:
            header = _header(record, where)
        else:
            parts.append(_part(record, where))
    if header is None:
        raise RecordingError("empty: no header line")
    if pending is not None and pending.endswith("\n"):
        raise RecordingError("last line: not JSON")
    return Recording(header, tuple(parts))


def _header(record: dict[str, Any], where: str) -> Header:
    version = record.get("sserelay_recording")
    if version is None:
        raise RecordingError(f"{where}: not a sserelay recording (no 'sserelay_recording')")
    if version != VERSION:
        raise RecordingError(f"{where}: format version {version!r}; this sserelay reads {VERSION}")
    status = record.get("status")
    return Header(
        str(_text(record.get("method", "GET"), where, nullable=False)),
        str(_text(record.get("path", "/"), where, nullable=False)),
        status if isinstance(status, int) and not isinstance(status, bool) else 200,
        str(_text(record.get("content_type", "text/event-stream"), where, nullable=False)),
    )
