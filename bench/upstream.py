"""A cheap OpenAI-style streaming upstream for the proxy capacity figure.

    python bench/upstream.py [--port 0] [--interval 0.02] [--seconds 120]

Answers any request (any method and path; the body is read and ignored) with
`200 text/event-stream`, chunked, and then one `chat.completion.chunk` event
every `--interval` seconds, for `--seconds` (then a `finish_reason: stop`
chunk, `data: [DONE]` and the last chunk; the connection stays open for the
next request, so a proxy's keep-alive pool works). Each event's content is
` NS`, the time.monotonic_ns() taken just before its write(2): a client on the
same host computes the event's delay from upstream send to client receive,
whatever the proxy between them re-encodes (the content survives every one).

Cheap on purpose, so it is never the bottleneck: no HTTP library, uvloop, one
timer for all streams. Streams are spread over `--slots` phases of the
interval (a stream's phase is its arrival order modulo the slots), so the
proxy sees a steady trickle, as from many independent model streams, not one
burst per interval. Prints `upstream: serving on http://HOST:PORT/` on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import cast

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
#: One delta; %d is the send time. `created` and `id` are fixed: nothing reads them.
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" %d"},"finish_reason":null}]}'
    b"\n\n"
)
END = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
MAX_HEAD = 64 * 1024


def chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Stream(asyncio.Protocol):
    """One connection: requests in, one endless-until-`seconds` event stream out per request."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._body_left = 0
        self.ends_at = 0  # monotonic_ns at which the current stream ends; 0: not streaming

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak its API.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.ends_at:
            return  # nothing is pipelined while a stream runs
        self._buffer += data
        while not self.ends_at:
            if self._body_left:
                taken = min(self._body_left, len(self._buffer))
                self._buffer = self._buffer[taken:]
                self._body_left -= taken
                if self._body_left:
                    return
                self._start()
                continue
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD and self.transport is not None:
                    self.transport.close()
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            self._body_left = _content_length(head)
            if not self._body_left:
                self._start()

    def _start(self) -> None:
        assert self.transport is not None
        self.transport.write(HEAD)
        self.ends_at = time.monotonic_ns() + self.upstream.length_ns
        self.upstream.add(self)

    def tick(self, now_ns: int) -> bool:
        """Send the next event (or the end); False once this stream is over."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if now_ns >= self.ends_at:
            transport.write(chunked(END) + b"0\r\n\r\n")
            self.ends_at = 0
            return False
        transport.write(chunked(CHUNK % time.monotonic_ns()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ends_at = 0
        self.upstream.discard(self)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip() or b"0")
    return 0


class Upstream:
    """The streams and the one timer that paces them all."""

    def __init__(self, interval: float, seconds: float, slots: int) -> None:
        self.interval = interval
        self.length_ns = int(seconds * 1e9)
        self.slots: list[set[Stream]] = [set() for _ in range(slots)]
        self._arrivals = 0
        self._tick_s = interval / slots
        self._slot = 0
        self._loop = asyncio.get_running_loop()
        self._next = self._loop.time() + self._tick_s
        self._loop.call_at(self._next, self._tick)

    def add(self, stream: Stream) -> None:
        self.slots[self._arrivals % len(self.slots)].add(stream)
        self._arrivals += 1

    def discard(self, stream: Stream) -> None:
        for slot in self.slots:
            slot.discard(stream)

    def _tick(self) -> None:
        streams = self.slots[self._slot]
        if streams:
            now = time.monotonic_ns()
            for stream in [s for s in streams if not s.tick(now)]:
                streams.discard(stream)
        self._slot = (self._slot + 1) % len(self.slots)
        # Absolute deadlines: a late wake-up does not drift the rate.
        self._next += self._tick_s
        self._loop.call_at(max(self._next, self._loop.time()), self._tick)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream(args.interval, args.seconds, args.slots)
    server = await loop.create_server(lambda: Stream(upstream), args.host, args.port, backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"upstream: serving on http://{host}:{port}/", file=sys.stderr, flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between events")
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each stream")
    parser.add_argument("--slots", type=int, default=20, help="phases the streams spread over")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
