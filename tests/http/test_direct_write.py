"""The `sserelay.connection` extension's `write(body)` (http/server.py) and ASGISink over it.

A flush on our own server writes the body straight to the transport, framed as a chunk,
while the transport takes it; it falls back to ASGI `send` while the transport is paused
(a client that does not read), for a response that is not chunked (HEAD), and says False,
writing nothing, once the connection is gone. Real sockets, the server the CLI runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from sserelay.http import server
from sserelay.http.asgi import ASGISink
from sserelay.streaming.stream import SSE_HEADERS
from tests.conftest import run_bounded as run

App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Counted:
    """An ASGI `send` that counts the body messages passing through it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.bodies = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            self.bodies += 1
        await self._send(message)


async def with_server(app: App, client: Callable[[int], Awaitable[None]]) -> None:
    sock = server.listen("127.0.0.1", 0)
    finished = asyncio.Event()
    serving = asyncio.create_task(server.serve_app(app, sock, finished=finished, on_signal=None))
    try:
        await client(sock.getsockname()[1])
    finally:
        finished.set()
        await serving
        sock.close()


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    """A chunked response: its head, and each chunk as framed."""
    head = await reader.readuntil(b"\r\n\r\n")
    chunks = []
    while size := int((await reader.readline()).strip(), 16):
        chunks.append(await reader.readexactly(size))
        assert await reader.readline() == b"\r\n"
    assert await reader.readline() == b"\r\n"
    return head, chunks


def test_flushes_go_straight_to_the_transport_framed_as_chunks() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        counted = Counted(send)
        sink = ASGISink(receive, counted, scope)
        await sink.start(SSE_HEADERS)
        flushed = []
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            sink.write(part)
            flushed.append((await sink.flush(), sink.accepted))
        sink.write(b"")  # nothing: no chunk (an empty one would end the response)
        flushed.append((await sink.flush(), sink.accepted))
        # The express lane's way: asked and written with no await.
        flushed.append((sink.ready(), sink.write_now(b"data: 3\n\n")))
        await sink.end()
        seen.update(flushed=flushed, bodies=counted.bodies, ended=sink.ready())

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, chunks = await read_chunked(reader)
        seen.update(head=head, chunks=chunks)
        writer.close()
        await writer.wait_closed()

    run(with_server(app, client))
    assert seen["chunks"] == [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    assert b"transfer-encoding: chunked" in seen["head"]
    assert seen["flushed"] == [(True, True)] * 4
    assert seen["bodies"] == 1  # only the end went through ASGI send
    assert seen["ended"] is False  # a complete response takes no more


def test_a_paused_transport_falls_back_to_send_and_keeps_the_order() -> None:
    part = b"x" * 65536
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        counted = Counted(send)
        sink = ASGISink(receive, counted, scope)
        await sink.start(SSE_HEADERS)
        ready = []
        for i in range(200):  # 13 MB: far over the transport's high-water mark
            ready.append(sink.ready())
            sink.write(b"%d:" % i + part)
            assert await sink.flush()
        await sink.end()
        seen["bodies"] = counted.bodies
        seen["ready"] = ready

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)  # not reading: the server's writes pile up and pause it
        _, chunks = await read_chunked(reader)
        seen["chunks"] = chunks
        writer.close()
        await writer.wait_closed()

    run(with_server(app, client))
    assert b"".join(seen["chunks"]) == b"".join(b"%d:" % i + part for i in range(200))
    assert seen["bodies"] > 1  # some writes waited in send() for the transport to drain
    assert seen["ready"][0] and not all(seen["ready"])  # not ready while it is paused


def test_a_gone_client_is_told_at_once_and_nothing_is_billed() -> None:
    seen: dict[str, Any] = {}
    wrote_one = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sink = ASGISink(receive, send, scope)
        await sink.start(SSE_HEADERS)
        sink.write(b"data: 1\n\n")
        first = await sink.flush()
        wrote_one.set()
        await sink.wait_disconnected()
        sink.write(b"data: 2\n\n")
        seen["flushes"] = [first, await sink.flush(), sink.accepted, sink.ready()]

    async def client(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wrote_one.wait()
        writer.close()
        await writer.wait_closed()
        for _ in range(500):
            if "flushes" in seen:
                break
            await asyncio.sleep(0.01)

    run(with_server(app, client))
    assert seen["flushes"] == [True, False, False, False]


def test_a_head_request_goes_through_send() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        counted = Counted(send)
        sink = ASGISink(receive, counted, scope)
        await sink.start(SSE_HEADERS)
        sink.write(b"data: 1\n\n")
        flushed = await sink.flush()
        await sink.end()
        seen[scope["method"]] = (flushed, counted.bodies)

    async def client(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        seen["head"] = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")  # no body came between them
        seen["next"] = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    run(with_server(app, client))
    assert seen["head"].startswith(b"HTTP/1.1 200 OK")
    assert seen["next"].startswith(b"HTTP/1.1 200 OK")
    assert seen["HEAD"] == (True, 2)  # the write and the end went through send
    assert seen["GET"] == (True, 1)
