"""The floor: a bare asyncio socket writer, no HTTP or SSE library (the physical limit).

    python bench/contenders/floor.py [--port P] [--keep] [SOURCE]

It answers any request with a fixed response head (`Connection: close`, the
body runs to EOF, so no chunk framing) and then writes events already framed:
a file is framed whole before the server listens and written in one call;
stdin lines are framed as each read completes and written to every connected
client at once (`--keep` is accepted for the common command line; the floor
always broadcasts stdin). uvloop when installed: the fastest loop there is.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

from common import announce, listen, parse_args

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Connection: close\r\n\r\n"
)


def frame(lines: list[bytes], first_id: int) -> bytes:
    return b"".join(
        b"id: %d\ndata: %s\n\n" % (event_id, line) for event_id, line in enumerate(lines, first_id)
    )


class Client(asyncio.Protocol):
    def __init__(self, server: Floor) -> None:
        self.server = server
        self.request = b""
        self.head_seen = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but speak its API.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.head_seen:  # nothing after the request head matters
            return
        self.request += data
        if b"\r\n\r\n" in self.request:
            self.head_seen = True
            self.server.start(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.clients.discard(self)


class Floor:
    def __init__(self, payload: bytes | None) -> None:
        self.payload = payload  # the whole file, framed; None: broadcast stdin
        self.clients: set[Client] = set()

    def start(self, client: Client) -> None:
        assert client.transport is not None
        if self.payload is not None:
            client.transport.write(HEAD + self.payload)
            client.transport.close()  # after the buffer drains
        else:
            client.transport.write(HEAD)
            self.clients.add(client)

    async def broadcast_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        pipe = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        rest, next_id = b"", 1
        while block := await reader.read(1 << 20):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            if lines:
                data = frame(lines, next_id)
                next_id += len(lines)
                for client in self.clients:
                    assert client.transport is not None
                    client.transport.write(data)
        for client in list(self.clients):
            assert client.transport is not None
            client.transport.close()


async def serve() -> None:
    args = parse_args("floor")
    payload = None
    if args.source != "-":
        with open(args.source, "rb") as source:
            payload = frame(source.read().splitlines(), 1)
    floor = Floor(payload)
    sock = listen(args.host, args.port)
    server = await asyncio.get_running_loop().create_server(lambda: Client(floor), sock=sock)
    announce("floor", sock)
    if payload is None:
        await floor.broadcast_stdin()
    await server.serve_forever()


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
