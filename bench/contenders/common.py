"""What the Python reference contenders share, so they differ only in their HTTP/SSE stack.

Every contender takes the same command line as `sserelay serve`'s core:
`[--host H] [--port P] [--keep] [SOURCE]` (SOURCE a file, `-` or nothing for
stdin), prints `NAME: serving on http://HOST:PORT/` on stderr once it listens,
and sends one SSE event per input line, flushing each. Without `--keep` each
request streams the source from its start; with `--keep` one reader
broadcasts the source to every connected client (the fan-out figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator

READ_SIZE = 256 * 1024


def parse_args(name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=name)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep", action="store_true", help="broadcast one source to all")
    parser.add_argument("source", nargs="?", default="-")
    return parser.parse_args()


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket: port 0 picks a free one, which we then announce."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def announce(name: str, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    print(f"{name}: serving on http://{host}:{port}/", file=sys.stderr, flush=True)


async def read_lines(source: str) -> AsyncIterator[str]:
    """The lines of a file or stdin, without blocking the event loop.

    A file is read in 256 KiB blocks in a worker thread; stdin through the
    event loop, so a line is yielded the moment it arrives (latency)."""
    if source == "-":
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_SIZE)
        pipe = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            async for raw in reader:
                yield raw.rstrip(b"\r\n").decode(errors="replace")
        finally:
            transport.close()
        return
    fd = os.open(source, os.O_RDONLY)
    try:
        rest = b""
        while block := await asyncio.to_thread(os.read, fd, READ_SIZE):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                yield raw.rstrip(b"\r").decode(errors="replace")
        if rest:
            yield rest.decode(errors="replace")
    finally:
        os.close(fd)


class Hub:
    """One reader, many clients: each subscriber gets every (id, line) on its own queue;
    None ends the stream."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[tuple[int, str] | None]] = set()

    def subscribe(self) -> asyncio.Queue[tuple[int, str] | None]:
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[int, str] | None]) -> None:
        self.queues.discard(queue)

    async def run(self, source: str) -> None:
        event_id = 0
        async for line in read_lines(source):
            event_id += 1
            for queue in self.queues:
                queue.put_nowait((event_id, line))
        for queue in self.queues:
            queue.put_nowait(None)
