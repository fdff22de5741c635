"""Tests for `sserelay.sources.http1`: the proxy's HTTP/1.1 client on httptools.

Framing is tested without sockets (bytes fed to a connection, split every way); the pool,
timeouts, back-pressure and TLS against real servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.errors import UpstreamError
from sserelay.sources import http1, http1_response
from sserelay.sources.http1 import (
    ConnectError,
    LocalProtocolError,
    Pool,
    ReadTimeout,
    RemoteProtocolError,
    Response,
    ServerDisconnected,
)
from sserelay.sources.upstream import Upstream
from tests.conftest import run_bounded as run

ORIGIN = ("http", "127.0.0.1", 1)

# --------------------------------------------------------------------------- without sockets


class FakeTransport:
    """What a connection asks of its transport, recorded."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.write(piece)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def exchange(method: bytes = b"GET") -> tuple[http1.Connection, Response, FakeTransport, Pool]:
    """A connection on a fake transport with one request sent on it."""
    pool = Pool(connect_timeout=1, read_timeout=None)
    connection = http1.Connection(pool, ORIGIN, asyncio.get_running_loop())
    transport = FakeTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    response = Response(connection, method, None)
    connection.start(response, b"%s / HTTP/1.1\r\nhost: h\r\n\r\n" % method, b"")
    return connection, response, transport, pool


async def body_of(response: Response) -> bytes:
    parts = []
    while part := await response.read():
        parts.append(part)
    return b"".join(parts)


def fed(pieces: list[bytes], method: bytes = b"GET", then_close: bool = False) -> Any:
    """Feed `pieces` to a fresh exchange; return (status, headers, body, kept in the pool)."""

    async def scenario() -> tuple[int, list[tuple[bytes, bytes]], bytes, int]:
        connection, response, _, pool = exchange(method)
        for piece in pieces:
            connection.data_received(piece)
        if then_close:
            connection.connection_lost(None)
        await response.wait_head()
        body = await body_of(response)
        return response.status, response.headers, body, pool.idle_connections

    return run(scenario())


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"9\r\ndata: 1\n\n\r\n"
    b"9\r\ndata: 2\n\n\r\n"
    b"0\r\n\r\n"
)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_any_split_of_a_chunked_answer_reads_the_same(cuts: list[int]) -> None:
    status, headers, body, kept = fed(splits(CHUNKED, cuts))
    assert (status, body, kept) == (200, b"data: 1\n\ndata: 2\n\n", 1)
    assert headers == [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked")]


def test_a_read_hands_over_one_pieces_bytes_as_they_came() -> None:
    async def scenario() -> list[bytes]:
        connection, response, _, _ = exchange()
        second = CHUNKED.index(b"9\r\ndata: 2")
        connection.data_received(CHUNKED[:second])  # the head and the first chunk
        await response.wait_head()
        first = await response.read()
        connection.data_received(CHUNKED[second:])
        return [first, await response.read(), await response.read()]

    assert run(scenario()) == [b"data: 1\n\n", b"data: 2\n\n", b""]


def test_content_length_body_and_reuse() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert fed([answer])[2:] == (b"hello", 1)


def test_a_body_until_the_close_ends_with_it_and_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, part two"
    assert fed([answer], then_close=True)[2:] == (b"part one, part two", 0)


@pytest.mark.parametrize(
    ("answer", "kept"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", 0),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", 0),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n", 0),
    ],
)
def test_what_is_not_reused(answer: bytes, kept: int) -> None:
    assert fed([answer])[2:] == (b"hello", kept)


def test_head_answers_have_no_body_whatever_they_say() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    assert fed([answer], method=b"HEAD")[2:] == (b"", 1)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    assert fed([b"HTTP/1.1 %d X\r\n\r\n" % status])[0::2] == (status, b"")


def test_an_interim_answer_is_skipped() -> None:
    answer = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    status, headers, body, _ = fed([answer])
    assert (status, headers, body) == (201, [(b"Content-Length", b"2")], b"ok")


def test_reason_phrase() -> None:
    async def scenario() -> str:
        connection, response, _, _ = exchange()
        for byte in b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n":
            connection.data_received(bytes([byte]))
        await response.wait_head()
        return response.reason

    assert run(scenario()) == "Internal Server Error"


OK = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    ("pieces", "error", "message"),
    [
        ([OK + b"Content-Length: 10\r\n\r\nabc"], ServerDisconnected, "not complete"),
        ([OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"], ServerDisconnected, "complete"),
        ([OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"], RemoteProtocolError, "malformed"),
    ],
)  # fmt: skip
def test_a_body_cut_short_or_malformed_fails_after_what_came(
    pieces: list[bytes], error: type[Exception], message: str
) -> None:
    async def scenario() -> bytes:
        connection, response, _, pool = exchange()
        for piece in pieces:
            connection.data_received(piece)
        connection.connection_lost(None)
        await response.wait_head()
        received = await response.read() if b"abc" in pieces[0] else b""
        with pytest.raises(error, match=message):
            await response.read()
        response.close()
        assert pool.idle_connections == 0
        return received

    run(scenario())


def test_a_connection_closed_before_the_head() -> None:
    async def scenario() -> None:
        connection, response, _, _ = exchange()
        connection.data_received(b"HTTP/1.1 200")
        connection.connection_lost(None)
        with pytest.raises(ServerDisconnected, match="without answering"):
            await response.wait_head()

    run(scenario())


def test_closing_before_the_end_closes_the_connection_after_it_keeps_it() -> None:
    async def scenario() -> tuple[bool, bool, int]:
        connection, response, transport, pool = exchange()
        connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await response.wait_head()
        response.close()
        early = transport.closed
        connection, response, transport, pool = exchange()
        connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
        await response.wait_head()
        response.close()  # the body is complete (unread): the connection is clean
        return early, transport.closed, pool.idle_connections

    assert run(scenario()) == (True, False, 1)


def test_a_slow_reader_pauses_the_socket_and_resumes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1_response, "MAX_BUFFERED", 10)

    async def scenario() -> list[object]:
        connection, response, transport, _ = exchange()
        connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n")
        await response.wait_head()
        seen: list[object] = []
        for _ in range(3):
            connection.data_received(b"12345678")
            seen.append(transport.reading)
        seen.append(await response.read())
        seen.append(transport.reading)
        return seen

    assert run(scenario()) == [True, False, False, b"12345678" * 3, True]


def test_express_takes_pieces_only_while_a_reader_waits_with_nothing_before_them() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        connection, response, _, _ = exchange()
        second = CHUNKED.index(b"9\r\ndata: 2")
        offered: list[bytes] = []

        def take(data: bytes) -> bool:
            offered.append(data)
            return data != b"data: 2\n\n"  # the second goes to the reader

        response.express(take)
        connection.data_received(CHUNKED[:second])  # nobody reads yet: not offered
        await response.wait_head()
        read = [await response.read()]
        reading = asyncio.ensure_future(response.read())
        await asyncio.sleep(0)  # the reader waits now
        connection.data_received(b"9\r\ndata: 3\n\n\r\n")  # taken: the reader sleeps on
        connection.data_received(CHUNKED[second:])  # declined: read, then the end
        read += [await reading, await response.read()]
        return offered, read

    offered, read = run(scenario())
    assert offered == [b"data: 3\n\n", b"data: 2\n\n"]
    assert read == [b"data: 1\n\n", b"data: 2\n\n", b""]


def test_an_express_error_is_raised_by_the_waiting_read_and_ends_the_offers() -> None:
    async def scenario() -> tuple[str, int]:
        connection, response, _, _ = exchange()
        connection.data_received(CHUNKED[: CHUNKED.index(b"9\r\n")])
        await response.wait_head()
        calls = 0

        def fail(data: bytes) -> bool:
            nonlocal calls
            calls += 1
            raise ValueError("broken consumer")

        response.express(fail)
        reading = asyncio.ensure_future(response.read())
        await asyncio.sleep(0)
        connection.data_received(b"9\r\ndata: 1\n\n\r\n")
        with pytest.raises(ValueError) as raised:
            await reading
        connection.data_received(b"9\r\ndata: 2\n\n\r\n")
        return str(raised.value), calls

    assert run(scenario()) == ("broken consumer", 1)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"1\r\nx-injected: 1")],
        [(b"x-a", b"1\nx-b: 2")],
        [(b"x-a\r\n", b"1")],
        [(b"x-a", b"1\0")],
    ],
)
def test_a_header_with_a_line_end_is_never_sent(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(LocalProtocolError):
        http1._request_head(b"GET", b"/", headers, b"")
    with pytest.raises(LocalProtocolError):
        http1._request_head(b"GET", b"/a b", [], b"")


def test_content_length_when_there_is_a_body_or_one_is_expected() -> None:
    def head(method: bytes, body: bytes) -> bytes:
        return http1._request_head(method, b"/x", [(b"host", b"h")], body)

    assert head(b"GET", b"") == b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n"
    assert head(b"POST", b"") == b"POST /x HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
    assert head(b"DELETE", b"{}").endswith(b"content-length: 2\r\n\r\n")


# --------------------------------------------------------------------------- real sockets

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[int, list[int]]]:
    """A server on a free loopback port; yields (port, a list that counts connections)."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with a small whole body."""
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


async def get(pool: Pool, port: int, scheme: str = "http", host: str = "127.0.0.1") -> bytes:
    response = await pool.request((scheme, host, port), b"GET", b"/", [(b"host", b"h")])
    return await body_of(response)


def test_the_pool_keeps_at_most_max_idle_connections() -> None:
    async def scenario() -> tuple[int, int, int]:
        async with serving(answer_each) as (port, connections):
            pool = Pool(connect_timeout=1, read_timeout=1, max_idle=1)
            origin = ("http", "127.0.0.1", port)
            one, two = await asyncio.gather(
                *(pool.request(origin, b"GET", b"/", [(b"host", b"h")]) for _ in range(2))
            )
            await body_of(one)
            await body_of(two)
            idle = pool.idle_connections
            await get(pool, port)
            await pool.aclose()
            return len(connections), idle, pool.idle_connections

    assert run(scenario()) == (2, 1, 0)


def test_an_idle_connection_expires_and_one_the_server_closed_is_not_reused() -> None:
    now = [0.0]

    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def scenario() -> tuple[int, int]:
        async with serving(answer_each) as (port, connections):
            pool = Pool(connect_timeout=1, read_timeout=1, clock=lambda: now[0])
            await get(pool, port)
            now[0] = http1.KEEPALIVE_EXPIRY + 0.1
            await get(pool, port)  # the first one expired
            expired = len(connections)
            await pool.aclose()
        async with serving(close_after_one) as (port, connections):
            pool = Pool(connect_timeout=1, read_timeout=1)
            await get(pool, port)
            for _ in range(200):  # until the server's close has reached the pool
                if not pool.idle_connections:
                    break
                await asyncio.sleep(0.005)
            assert await get(pool, port) == b"ok"
            await pool.aclose()
            return expired, len(connections)

    assert run(scenario()) == (2, 2)


def test_the_read_timeout_counts_while_a_reader_waits_only() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await asyncio.sleep(0.15)
        writer.write(b"1\r\nb\r\n")  # then nothing more
        await writer.drain()
        await reader.read()

    async def scenario() -> tuple[bytes, bytes, float]:
        loop = asyncio.get_running_loop()
        async with serving(trickle) as (port, _):
            pool = Pool(connect_timeout=1, read_timeout=0.2)
            response = await pool.request(("http", "127.0.0.1", port), b"GET", b"/", [])
            first = await response.read()
            await asyncio.sleep(0.3)  # not waiting: no timeout, however long
            second = await response.read()
            started = loop.time()
            with pytest.raises(ReadTimeout):
                await response.read()
            waited = loop.time() - started
            response.close()
            await pool.aclose()
            return first, second, waited

    first, second, waited = run(scenario())
    assert (first, second) == (b"a", b"b")
    assert 0.19 <= waited < 1.0


def test_a_reset_mid_body_is_a_disconnect() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the close")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario() -> None:
        async with serving(reset) as (port, _):
            pool = Pool(connect_timeout=1, read_timeout=1)
            response = await pool.request(("http", "127.0.0.1", port), b"GET", b"/", [])
            with pytest.raises(ServerDisconnected, match="reset"):
                while await response.read():
                    pass
            await pool.aclose()

    run(scenario())


def test_a_cancel_while_waiting_for_the_head_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # until the client closes
        closed.set()

    async def scenario() -> int:
        async with serving(silent) as (port, _):
            pool = Pool(connect_timeout=1, read_timeout=10)
            task = asyncio.create_task(get(pool, port))
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 2)
            return pool.idle_connections

    assert run(scenario()) == 0


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA, name: str = "localhost") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def trusting(ca: trustme.CA) -> Callable[[], ssl.SSLContext]:
    def make() -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        return context

    return make


def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    async def scenario() -> tuple[bytes, int]:
        async with serving(answer_each, tls_server_context(ca)) as (port, connections):
            pool = Pool(connect_timeout=2, read_timeout=2, ssl_context=trusting(ca))
            bodies = [await get(pool, port, "https", "localhost") for _ in range(2)]
            await pool.aclose()
            assert bodies[0] == bodies[1]
            return bodies[0], len(connections)

    assert run(scenario()) == (b"ok", 1)


@pytest.mark.parametrize(
    ("trust", "name", "message"),
    [
        (False, "localhost", "CERTIFICATE_VERIFY_FAILED"),  # the system's CAs do not know it
        (True, "other.example", "CERTIFICATE_VERIFY_FAILED"),  # a certificate for another name
    ],
)
def test_https_verifies_the_certificate_and_the_host_name(
    ca: trustme.CA, trust: bool, name: str, message: str
) -> None:
    async def scenario() -> None:
        async with serving(answer_each, tls_server_context(ca, name)) as (port, _):
            pool = Pool(
                connect_timeout=2, read_timeout=2, ssl_context=trusting(ca) if trust else None
            )
            try:
                with pytest.raises(ConnectError, match=message):
                    await get(pool, port, "https", "localhost")
            finally:
                await pool.aclose()

    run(scenario())


def test_an_https_upstream_names_a_certificate_failure(
    ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    async def scenario(port_box: list[int]) -> None:
        async with serving(answer_each, tls_server_context(ca)) as (port, _):
            port_box.append(port)
            upstream = Upstream(f"https://localhost:{port}/v1")
            try:
                response = await upstream.open("GET", b"/", b"", [], b"")
                assert [c async for c in response.chunks()] == [b"ok"]
            finally:
                await upstream.aclose()

    with pytest.raises(UpstreamError, match=r"^cannot connect to upstream localhost:\d+: .*"):
        run(scenario([]))
    # SSL_CERT_FILE is read as httpx read it: then the CA is trusted.
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    run(scenario([]))


# --------------------------------------------------------------------------- content codings


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send it
        ("gzip, deflate", lambda b: zlib.compress(zlib.compress(b, wbits=31))),
    ],
)
def test_deflate_bodies_are_decoded(coding: str, encode: Callable[[bytes], bytes]) -> None:
    body = encode(b"data: hello\n\n" * 50)
    bodies = decoded(
        b"content-encoding: %s\r\ncontent-length: %d\r\n" % (coding.encode(), len(body)), body
    )
    assert bodies == b"data: hello\n\n" * 50


def test_a_coding_sserelay_cannot_undo_is_refused_clearly() -> None:
    with pytest.raises(UpstreamError, match=r"'br' coding, which sserelay cannot decode"):
        decoded(b"content-encoding: br\r\ncontent-length: 3\r\n", b"xyz")


def test_a_body_that_does_not_decode() -> None:
    with pytest.raises(UpstreamError, match=r"in gzip coding that does not decode"):
        decoded(b"content-encoding: gzip\r\ncontent-length: 3\r\n", b"xyz")


def decoded(fields: bytes, body: bytes) -> bytes:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n%s\r\n" % fields)
        for i in range(0, len(body), 7):  # in small pieces
            writer.write(body[i : i + 7])
            await writer.drain()
        await reader.read()

    async def scenario() -> bytes:
        async with serving(handle) as (port, _):
            upstream = Upstream(f"http://127.0.0.1:{port}/")
            try:
                response = await upstream.open("GET", b"/", b"", [], b"")
                return b"".join([c async for c in response.chunks()])
            finally:
                await upstream.aclose()

    return run(scenario())


def test_user_info_in_the_url_is_sent_as_basic_auth() -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with serving(handle) as (port, _):
            upstream = Upstream(
                f"http://us%40er:p%3Ass@127.0.0.1:{port}/", headers=[("Authorization", "Bearer x")]
            )
            try:
                response = await upstream.open("POST", b"/", b"", [], b"")
                await response.aclose()
            finally:
                await upstream.aclose()

    run(scenario())
    head = heads[0].decode()
    assert "authorization: Basic dXNAZXI6cDpzcw==\r\n" in head  # base64 of "us@er:p:ss"
    assert "Bearer" not in head and "us%40er" not in head
    assert head.startswith(f"POST / HTTP/1.1\r\nhost: 127.0.0.1:{head.split(':')[2]}")
    assert "content-length: 0\r\n" in head
