"""The load generator every contender faces: a light raw-socket SSE client.

No HTTP library on purpose: one asyncio Protocol per connection, an
incremental HTTP/1.1 response parser (chunked or read-until-close bodies) and
two ways to consume the event stream:

- counting (throughput): events are counted as blank lines with bytes.count,
  so a 256 KiB read costs two C calls, not a Python loop per event;
- stamped (latency, fan-out): each event's `data:` is `SEQ MONOTONIC_NS`
  written by bench/producer.py; the client records receive time minus stamp.

Stamps and receive times both come from time.monotonic_ns(): CLOCK_MONOTONIC,
one clock for every process on the host, so producer and client may differ.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

#: What a stamped client reports per event: (seq, receive_ns - stamp_ns).
OnStamp = Callable[[int, int], None]


class ResponseError(Exception):
    """The server answered something other than a 200 event stream."""


@dataclass(slots=True)
class StreamStats:
    events: int = 0
    body_bytes: int = 0
    first_event_ns: int | None = None
    last_event_ns: int | None = None
    lags_ns: list[int] = field(default_factory=list)


class SSEClient(asyncio.Protocol):
    """One GET of an event stream.

    `headers_received` resolves on the response head (the server accepted the
    stream), `first_event` on the first complete event, `done` when the body
    ends (terminating chunk or EOF) or the connection is lost."""

    def __init__(self, host: str, port: int, path: str = "/", *, stamped: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        self.stats = StreamStats()
        self.stamped = stamped
        self.on_stamp: OnStamp | None = None
        self.headers_received: asyncio.Future[None] = loop.create_future()
        self.first_event: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._head = b""
        self._in_body = False
        self._chunked = False
        self._pending = b""  # an incomplete chunk-size line
        self._chunk_left = 0  # data bytes left in the current chunk
        self._skip = 0  # the CRLF after a chunk's data, possibly split across reads
        self._tail = b""  # the last bytes of the body, for blank lines split across reads
        self._text = b""  # stamped mode: body bytes not yet ending an event

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak its API.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        # Stamp first: everything below is the client's own cost, not the server's.
        now = time.monotonic_ns()
        if self.done.done():  # e.g. the last-chunk's trailing CRLF, in a read of its own
            return
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._start(head)
            if not data or self.done.done():
                return
        if self._chunked:
            self._dechunk(data, now)
        else:
            self._body(data, now)

    def eof_received(self) -> bool | None:
        self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # A read-until-close body ends here; a lost chunked body ends short (the counts tell).
        self._finish(None if self._in_body else ResponseError("connection lost before the head"))

    # -- parsing ---------------------------------------------------------------

    def _start(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            self._finish(ResponseError(f"status line {lines[0]!r}"))
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self._chunked = "chunked" in headers.get("transfer-encoding", "")
        self._in_body = True
        if not self.headers_received.done():
            self.headers_received.set_result(None)

    def _dechunk(self, data: bytes, now: int) -> None:
        # RFC 9112 §7.1: size line (hex, optional extensions), CRLF, data, CRLF; size 0 ends.
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos, end = 0, len(buf)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
            elif self._chunk_left:
                stop = min(end, pos + self._chunk_left)
                self._body(buf[pos:stop], now)
                self._chunk_left -= stop - pos
                pos = stop
                if not self._chunk_left:
                    self._skip = 2
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self._pending = buf[pos:]
                    return
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self._finish()
                    return
                self._chunk_left = size

    def _body(self, piece: bytes, now: int) -> None:
        stats = self.stats
        stats.body_bytes += len(piece)
        if self.stamped:
            self._stamped_events(piece, now)
            return
        # An event ends at a blank line: "\n\n" (sserelay, Go) or "\r\n\r\n" (the
        # Python references' default separator). A blank line split across two
        # reads is found in the 3+3 bytes around the seam.
        head = piece[:3]
        seam = self._tail + head
        count = piece.count(b"\n\n") + piece.count(b"\r\n\r\n")
        count += seam.count(b"\n\n") + seam.count(b"\r\n\r\n")
        count -= head.count(b"\n\n") + head.count(b"\r\n\r\n")
        count -= self._tail.count(b"\n\n") + self._tail.count(b"\r\n\r\n")
        self._tail = piece[-3:] if len(piece) >= 3 else (self._tail + piece)[-3:]
        if count:
            if stats.events == 0:
                stats.first_event_ns = now
                self.first_event.set_result(None)
            stats.events += count
            stats.last_event_ns = now

    def _stamped_events(self, piece: bytes, now: int) -> None:
        text = self._text + piece
        if b"\r" in text:
            if text.endswith(b"\r"):  # its LF may be in the next read
                self._text = text
                return
            text = text.replace(b"\r\n", b"\n")
        events = text.split(b"\n\n")
        self._text = events.pop()
        stats = self.stats
        for event in events:
            if event.startswith(b":") and b"\ndata" not in event:
                continue  # a comment-only frame (keep-alive ping) is no event
            stats.events += 1
            stats.last_event_ns = now
            if stats.first_event_ns is None:
                stats.first_event_ns = now
                self.first_event.set_result(None)
            start = event.find(b"data: ")
            if start < 0:
                continue
            line_end = event.find(b"\n", start)
            seq, _, stamp = event[start + 6 : None if line_end < 0 else line_end].partition(b" ")
            if stamp:
                lag = now - int(stamp)
                stats.lags_ns.append(lag)
                if self.on_stamp is not None:
                    self.on_stamp(int(seq), lag)

    def _finish(self, error: Exception | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)
                self.done.exception()  # mark retrieved: nobody may be awaiting it
        for future, what in (
            (self.headers_received, "the response head"),
            (self.first_event, "the first event"),
        ):
            if not future.done():
                future.set_exception(error or ResponseError(f"stream ended before {what}"))
                future.exception()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_stream(host: str, port: int, path: str = "/", *, stamped: bool = False) -> SSEClient:
    """Connect and send the GET; the response arrives on the returned client's futures."""
    loop = asyncio.get_running_loop()
    client = SSEClient(host, port, path, stamped=stamped)
    await loop.create_connection(lambda: client, host, port)
    return client


def percentile(sorted_values: list[int] | list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (fraction in [0, 1])."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return float(sorted_values[rank - 1])
