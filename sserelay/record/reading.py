"""Reading a recording of any readable version (format.py has the format): pure."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from sserelay.errors import RecordingError
from sserelay.record.format import (
    ENDS,
    READABLE_VERSIONS,
    Block,
    Chunk,
    Exchange,
    Part,
    Recording,
)

__all__ = ["read_recording"]


def read_recording(lines: Iterable[str]) -> Recording:
    """Parse a recording of any readable version; RecordingError (naming the line) if it is
    not one.

    A last line cut short (the recorder died mid-write) is dropped: everything before it
    was flushed whole."""
    reader: _Reader | None = None
    pending: str | None = None
    number = 0
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
        if reader is None:
            reader = _first(record, where)
        else:
            reader.read(record, number)
    if pending is not None and pending.endswith("\n"):
        raise RecordingError(f"line {number}: not JSON")
    if reader is None:
        raise RecordingError("empty: no header line")
    return reader.recording()


def _first(record: dict[str, Any], where: str) -> _Reader:
    version = record.get("sserelay_recording")
    if version is None:
        raise RecordingError(f"{where}: not a sserelay recording (no 'sserelay_recording')")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise RecordingError(f"{where}: format version {version!r}; this sserelay reads {readable}")
    if version == 1:
        return _ReaderV1(record, where)
    return _ReaderV2()


class _Reader:
    def read(self, record: dict[str, Any], number: int) -> None:
        raise NotImplementedError

    def recording(self) -> Recording:
        raise NotImplementedError


class _ReaderV1(_Reader):
    """Version 1: the header, then the parts of its one exchange."""

    def __init__(self, record: dict[str, Any], where: str) -> None:
        status = record.get("status")
        content_type = _text(record.get("content_type", "text/event-stream"), where)
        self._exchange = _exchange(
            where,
            number=1,
            method=_text(record.get("method", "GET"), where),
            path=_text(record.get("path", "/"), where),
            body_sha256=None,
            status=status if isinstance(status, int) and not isinstance(status, bool) else 200,
            headers=(("content-type", content_type),),
            # Version 1 kept no ending, and was always replayed as a whole answer.
            end="complete",
        )
        self._parts: list[Part] = []

    def read(self, record: dict[str, Any], number: int) -> None:
        self._parts.append(_part(record, f"line {number}"))

    def recording(self) -> Recording:
        exchange = self._exchange
        ended_at = self._parts[-1].t if self._parts else None
        return Recording(1, (replace(exchange, parts=tuple(self._parts), ended_at=ended_at),))


class _ReaderV2(_Reader):
    """Version 2: exchanges opened, added to and ended by their number, interleaved."""

    def __init__(self) -> None:
        self._opened: dict[int, tuple[Exchange, int]] = {}
        self._parts: dict[int, list[Part]] = {}
        self._ended: dict[int, tuple[str, float, int]] = {}

    def read(self, record: dict[str, Any], number: int) -> None:
        where = f"line {number}"
        n = record.get("exchange")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecordingError(f"{where}: 'exchange' must be a whole number from 1")
        if "method" in record:
            if n in self._opened:
                raise RecordingError(
                    f"{where}: exchange {n} was opened on line {self._opened[n][1]}"
                )
            self._opened[n] = (_opening(record, n, where), number)
            self._parts[n] = []
            return
        if n not in self._opened:
            raise RecordingError(f"{where}: exchange {n} is not opened on an earlier line")
        if n in self._ended:
            raise RecordingError(f"{where}: exchange {n} ended on line {self._ended[n][2]}")
        if "end" in record:
            end = record["end"]
            if end not in ENDS:
                raise RecordingError(f"{where}: 'end' must be one of {', '.join(ENDS)}")
            self._ended[n] = (end, _seconds(record, where), number)
            return
        self._parts[n].append(_part(record, where))

    def recording(self) -> Recording:
        exchanges = []
        for n in sorted(self._opened):
            end, ended_at, _ = self._ended.get(n, (None, None, 0))
            opened = self._opened[n][0]
            exchanges.append(
                replace(opened, parts=tuple(self._parts[n]), end=end, ended_at=ended_at)
            )
        return Recording(2, tuple(exchanges))


def _exchange(where: str, **fields: Any) -> Exchange:
    try:
        return Exchange(**fields)
    except ValueError as exc:
        raise RecordingError(f"{where}: {exc}") from None


def _opening(record: dict[str, Any], n: int, where: str) -> Exchange:
    headers = record.get("headers", [])
    if not isinstance(headers, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in headers
    ):
        raise RecordingError(f"{where}: 'headers' must be a list of [name, value] pairs")
    sha = record.get("body_sha256")
    return _exchange(
        where,
        number=n,
        method=_text(record.get("method"), where),
        path=_text(record.get("path"), where),
        body_sha256=None if sha is None else _text(sha, where),
        status=record.get("status"),
        headers=tuple((_text(name, where), _text(value, where)) for name, value in headers),
        t=_seconds(record, where, default=0.0),
    )


def _seconds(record: dict[str, Any], where: str, default: float | None = None) -> float:
    t = record.get("t", default)
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
        raise RecordingError(f"{where}: 't' must be a number of seconds")
    return float(t)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise RecordingError(f"{where}: expected a string")
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, from a \\ud800-style escape
        raise RecordingError(f"{where}: not valid Unicode text") from None
    return value


def _text_or_none(value: object, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _part(record: dict[str, Any], where: str) -> Part:
    t = _seconds(record, where)
    if "chunk" in record:
        return Chunk(t, _text(record["chunk"], where).encode())
    if "chunk_base64" in record:
        try:
            return Chunk(t, base64.b64decode(str(record["chunk_base64"]), validate=True))
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
            t,
            _text_or_none(record.get("data"), where),
            _text_or_none(record.get("event"), where),
            _text_or_none(record.get("id"), where),
            retry,
            tuple(_text(c, where) for c in comments),
        )
    except ValueError as exc:  # Event's own checks: a line end in event or id, NUL in id
        raise RecordingError(f"{where}: {exc}") from None
