"""Tests for `sserelay.sources.upstream`: URL joining, header rules, real sockets for the close."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from sserelay.errors import RequestError, UpstreamError, UpstreamTimeout
from sserelay.sources.upstream import Timeouts, Upstream, end_to_end, parse_header, redact_url
from tests.conftest import run_bounded as run

# --------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("base", "path", "query", "url"),
    [
        ("http://h:1/v1", b"/", b"", "http://h:1/v1"),
        ("http://h:1/v1/", b"/", b"", "http://h:1/v1/"),
        ("http://h:1/v1", b"/chat/completions", b"", "http://h:1/v1/chat/completions"),
        ("http://h:1/v1/", b"/chat", b"", "http://h:1/v1/chat"),
        ("http://h:1", b"/api/chat", b"", "http://h:1/api/chat"),
        ("http://h:1", b"/", b"", "http://h:1/"),
        ("http://h:1/v1", b"/a%2Fb", b"x=1", "http://h:1/v1/a%2Fb?x=1"),
        ("http://h:1/m?alt=sse", b"/", b"", "http://h:1/m?alt=sse"),
        ("http://h:1/m?alt=sse", b"/x", b"k=2", "http://h:1/m/x?alt=sse&k=2"),
    ],
)
def test_client_path_and_query_join_the_upstream_url(
    base: str, path: bytes, query: bytes, url: str
) -> None:
    assert str(Upstream(base).url_for(path, query)) == url


@pytest.mark.parametrize(
    ("path", "url"),
    [
        (b"/chat/../completions", "http://h:1/v1/completions"),
        (b"/chat/%2e%2E/models", "http://h:1/v1/models"),
        (b"/chat/./x", "http://h:1/v1/chat/x"),
        (b"/a/b/..", "http://h:1/v1/a/"),
        (b"/a/..", "http://h:1/v1"),  # `/`: the base URL itself
        (b"/a%2F..b/c", "http://h:1/v1/a%2F..b/c"),  # `%2F` is data; `..b` is no dot segment
        (b"/x/.../y", "http://h:1/v1/x/.../y"),
    ],
)
def test_dot_segments_are_resolved_within_the_base_path(path: bytes, url: str) -> None:
    assert str(Upstream("http://h:1/v1").url_for(path, b"")) == url


@pytest.mark.parametrize(
    "path",
    [
        b"/../../etc/passwd",
        b"/chat/../../admin",
        b"/a/../..",
        b"/%2e%2e/%2E%2E/etc/passwd",
        b"/%2E./admin",
        b"/.%2e/admin",
        b"/..%2f..%2fadmin",
        b"/x/..%5C..%5Cadmin",
        b"/x/..\\admin",
        b"/..;/admin",
        b"/x/.%2e;jsessionid=1/admin",
    ],
)
def test_a_path_that_leaves_the_base_path_is_refused(path: bytes) -> None:
    with pytest.raises(RequestError):
        Upstream("http://h:1/v1").url_for(path, b"")


@pytest.mark.parametrize("url", ["ftp://h/", "http:///nohost", "not a url", "h st:1/"])
def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(ValueError):
        Upstream(url)


def test_a_bare_host_and_port_is_http_as_curl_takes_it() -> None:
    # issue 18: `--upstream localhost:11434` is refused no longer
    assert str(Upstream("h:1/v1").base) == "http://h:1/v1"


def test_hop_by_hop_headers_and_those_connection_names_are_dropped() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"x-hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Authorization", b"Bearer end-to-end"),
        (b"X-Request-Id", b"7"),
    ]
    assert end_to_end(headers, drop=[b"X-Request-Id"]) == [(b"authorization", b"Bearer end-to-end")]


def test_parse_header() -> None:
    assert parse_header("Authorization:  Bearer sk-1 ") == ("Authorization", "Bearer sk-1")
    assert parse_header("X-Empty:") == ("X-Empty", "")


@pytest.mark.parametrize("line", ["Bearer sk-secret-1", ": sk-secret-1", "Bad Name: sk-secret-1"])
def test_a_bad_header_is_refused_without_showing_it(line: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_header(line)
    assert "sk-secret-1" not in str(caught.value)


def test_printed_urls_and_secrets() -> None:
    upstream = Upstream(
        "https://user:pw-secret@api.example.com/v1beta/models/m?alt=sse&key=AIzaSECRET123",
        headers=[("Authorization", "Bearer sk-abc")],
    )
    assert upstream.display == "https://api.example.com/v1beta/models/m"
    assert redact_url(httpx.URL("http://h/p?q=1#f")) == "http://h/p"
    assert set(upstream.secrets) == {"Bearer sk-abc", "AIzaSECRET123", "pw-secret"}


# --------------------------------------------------------------------------- real sockets


class Server:
    """An asyncio HTTP upstream that answers with `head` and `chunks`, then holds the
    connection open; `closed` is set (and `closed_at` taken) when the client closes it."""

    def __init__(self, chunks: list[bytes], answer: bool = True, end: bool = False) -> None:
        self.chunks = chunks
        self.answer = answer
        self.end = end
        self.connections = 0
        self.closed = asyncio.Event()
        self.closed_at = 0.0
        self.port = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if not self.answer:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for chunk in self.chunks:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                if not self.end:
                    break
                writer.write(b"0\r\n\r\n")
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.closed_at = time.monotonic()
        self.closed.set()
        writer.close()


async def first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    return await anext(chunks)


def test_cancelling_a_read_closes_the_upstream_connection_at_once() -> None:
    async def scenario() -> float:
        async with Server([b"data: 1\n\n"]) as server:
            upstream = Upstream(server.url)
            response = await upstream.open("GET", b"/s", b"", [], b"")
            chunks = response.chunks()
            assert await anext(chunks) == b"data: 1\n\n"
            reading = asyncio.create_task(first_chunk(chunks))  # waits: nothing more comes
            await asyncio.sleep(0.05)
            cancelled_at = time.monotonic()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            await asyncio.wait_for(server.closed.wait(), 1)
            await upstream.aclose()
            return server.closed_at - cancelled_at

    assert run(scenario()) < 0.5


def test_closing_a_response_early_closes_its_connection_but_a_whole_one_is_reused() -> None:
    async def scenario() -> tuple[bool, int]:
        async with Server([b"all of it"], end=True) as server:
            upstream = Upstream(server.url)
            for _ in range(2):  # read to the end: the connection goes back to the pool
                response = await upstream.open("GET", b"/", b"", [], b"")
                assert [c async for c in response.chunks()] == [b"all of it"]
            reused = server.connections == 1 and not server.closed.is_set()
            await upstream.aclose()
        async with Server([b"part"]) as server:
            upstream = Upstream(server.url)
            response = await upstream.open("GET", b"/", b"", [], b"")
            await response.aclose()  # body not read to its end
            await asyncio.wait_for(server.closed.wait(), 1)
            await upstream.aclose()
            return reused, server.connections

    assert run(scenario()) == (True, 1)


def test_refused_connection() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> None:
        upstream = Upstream(f"http://127.0.0.1:{port}/")
        try:
            await upstream.open("GET", b"/", b"", [], b"")
        finally:
            await upstream.aclose()

    with pytest.raises(UpstreamError, match=rf"^upstream 127.0.0.1:{port} refused the connection$"):
        run(scenario())


def test_dns_failure() -> None:
    async def scenario() -> None:
        upstream = Upstream("http://no-such-host.invalid/")
        try:
            await upstream.open("GET", b"/", b"", [], b"")
        finally:
            await upstream.aclose()

    with pytest.raises(
        UpstreamError, match=re.escape("cannot resolve upstream host 'no-such-host.invalid'")
    ):
        run(scenario())


def test_read_timeout_before_the_answer_and_mid_body() -> None:
    async def scenario(answer: bool) -> None:
        async with Server([b"1234"], answer=answer) as server:
            upstream = Upstream(server.url, timeouts=Timeouts(connect=1, read=0.1))
            try:
                response = await upstream.open("GET", b"/", b"", [], b"")
                async for _ in response.chunks():
                    pass
            finally:
                await upstream.aclose()

    with pytest.raises(UpstreamTimeout, match=r"sent nothing for 0.1 s before its response"):
        run(scenario(answer=False))
    with pytest.raises(UpstreamTimeout, match=r"0.1 s after 4 bytes of the body \(read timeout\)"):
        run(scenario(answer=True))


def test_a_body_that_dies_mid_stream() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{port}/")
        try:
            response = await upstream.open("GET", b"/", b"", [], b"")
            async for _ in response.chunks():
                pass
        finally:
            await upstream.aclose()
            server.close()

    with pytest.raises(UpstreamError, match="closed the connection mid-stream after 3 bytes"):
        run(scenario())


def test_added_headers_replace_the_clients_and_the_body_is_asked_for_uncompressed() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{port}/", headers=[("Authorization", "Bearer up")])
        client_headers = [
            (b"authorization", b"Bearer client"),
            (b"accept-encoding", b"gzip"),
            (b"host", b"proxy:8000"),
            (b"x-kept", b"yes"),
        ]
        try:
            response = await upstream.open("GET", b"/", b"", client_headers, b"")
            await response.aclose()
        finally:
            await upstream.aclose()
            server.close()

    run(scenario())
    head = seen[0].decode().lower()
    assert "authorization: bearer up\r\n" in head
    assert "bearer client" not in head
    assert "accept-encoding: identity\r\n" in head
    assert "host: 127.0.0.1:" in head and "proxy:8000" not in head
    assert "x-kept: yes\r\n" in head


def test_a_compressed_body_is_decoded_and_loses_its_coded_length() -> None:
    body = gzip.compress(b"data: hello\n\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n"
            b"content-type: text/event-stream\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[list[tuple[bytes, bytes]], bytes]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{port}/")
        try:
            response = await upstream.open("GET", b"/", b"", [], b"")
            return response.headers, b"".join([c async for c in response.chunks()])
        finally:
            await upstream.aclose()
            server.close()

    headers, decoded = run(scenario())
    assert decoded == b"data: hello\n\n"
    assert headers == [(b"content-type", b"text/event-stream")]


@pytest.mark.parametrize(
    ("env", "url", "named"),
    [
        ({"HTTPS_PROXY": "http://p:3128"}, "https://api.example.com/v1", "HTTPS_PROXY"),
        ({"https_proxy": "http://p:3128"}, "http://api.example.com/v1", None),
        ({"ALL_PROXY": "http://p:3128"}, "http://api.example.com/v1", "ALL_PROXY"),
        ({"HTTP_PROXY": "http://p:3128", "NO_PROXY": "example.com"}, "http://x.example.com", None),
        ({}, "https://api.example.com/v1", None),
    ],
)  # fmt: skip
def test_an_http_proxy_in_the_environment_is_named_as_not_used(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str, named: str | None
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Upstream(url).ignored_proxy == named
