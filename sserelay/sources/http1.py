"""The HTTP/1.1 client under `Upstream`: httptools (llhttp, in C) on an asyncio Protocol.

Why not httpx: reading an upstream body through httpx, httpcore, h11 and anyio cost the
proxy about 30 µs of CPU per relayed event, most of a core at 1,000 streams (issue 17);
llhttp does the same parsing in C and the body reaches the relay as the transport
delivers it, one `bytes` per read (no copy of ours when a read holds one body piece).

What it does: one request at a time per connection (no pipelining); a request body sent
with `Content-Length`; responses framed by `Content-Length`, `chunked`, or the closing of
the connection (RFC 9112 §6.3), and HEAD, 204 and 304 answers without a body; interim 1xx
answers skipped; TLS for `https` (the default context: the system's CAs, or those
`SSL_CERT_FILE`/`SSL_CERT_DIR` name, as httpx reads them; certificates and host names
verified; SNI; ALPN `http/1.1`); a pool per (scheme, host, port) with no cap on
connections in use and a cap on idle ones, an idle connection reused for
`KEEPALIVE_EXPIRY` seconds at most (httpx's default), never one the server closed or
sent bytes on while idle; a connect timeout (DNS, TCP and TLS together) and a read
timeout (the longest wait for the next byte while a reader waits: for the head, then
between body reads); reading paused while `MAX_BUFFERED` bytes wait for a slow reader.

What it does not do, that httpx did: HTTP proxies from `HTTP_PROXY`/`HTTPS_PROXY`/
`ALL_PROXY` (the upstream is always reached directly); HTTP/2; certifi's CA bundle unless
the system has no CAs at all; decoding `br` or `zstd` (the caller asks for `identity` and
decodes gzip and deflate itself); retrying a request. Redirects were off already.

A response closed before its end closes its connection at once, never returning it to
the pool: the upstream sees its socket close and can stop generating.

Errors are the HTTP1Error family (in http1_response.py, with the exchange itself); they
never leave `sources/`: `Upstream` turns each into an UpstreamError with its one-line
message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Iterable
from typing import cast

from .http1_response import (
    ConnectError,
    ConnectTimeout,
    HTTP1Error,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    Response,
    ServerDisconnected,
    one_line,
)

__all__ = [
    "KEEPALIVE_EXPIRY",
    "MAX_IDLE",
    "ConnectError",
    "ConnectTimeout",
    "Connection",
    "HTTP1Error",
    "LocalProtocolError",
    "Origin",
    "Pool",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "ServerDisconnected",
    "default_ssl_context",
]

Origin = tuple[str, str, int]
"""(scheme, host, port) of a server: what one pool of connections is for."""

#: How long an idle connection may be reused (httpx's `keepalive_expiry`): servers close
#: idle ones after their own timeout (Node.js: 5 s), and a request sent on a connection the
#: server is closing fails.
KEEPALIVE_EXPIRY = 5.0
#: Idle connections kept per pool (httpx's `max_keepalive_connections` as sserelay set it).
MAX_IDLE = 32


class Connection(asyncio.Protocol):
    """One connection to a server, carrying one exchange at a time."""

    def __init__(self, pool: Pool, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.exchange: Response | None = None
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection is not fit for reuse
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost() follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.exchange is not None:
            self.exchange.lost(exc)
        self.pool.forget(self)

    def start(self, exchange: Response, request: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        if body:
            self.transport.writelines((request, body))  # the body as is, not copied into one
        else:
            self.transport.write(request)

    def finished(self, exchange: Response, reusable: bool) -> None:
        if self.exchange is not exchange:
            return
        self.exchange = None
        transport = self.transport
        if (
            reusable
            and not self.lost
            and transport is not None
            and not transport.is_closing()
            # A request body the server answered before reading: the rest is still queued.
            and transport.get_write_buffer_size() == 0
        ):
            self.pool.keep(self)
        else:
            self.close()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Pool:
    """Connections to servers, reused while idle; see the module docstring for the rules.

    `connect_timeout` and `read_timeout` are in seconds (None: no limit)."""

    def __init__(
        self,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        max_idle: int = MAX_IDLE,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._make_ssl_context = ssl_context or default_ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._clock = clock
        self._idle: dict[Origin, list[Connection]] = {}
        self._idle_count = 0
        self._all: set[Connection] = set()

    @property
    def idle_connections(self) -> int:
        return self._idle_count

    async def request(
        self,
        origin: Origin,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes = b"",
    ) -> Response:
        """Send `method target` with `headers` (Host among them: nothing is added) and
        `body` (framed with Content-Length, which the caller leaves out); return once the
        final head is in. Raises an HTTP1Error; a cancel closes the connection."""
        request = _request_head(method, target, headers, body)
        connection = self._reuse(origin) or await self._connect(origin)
        response = Response(connection, method, self.read_timeout)
        try:
            connection.start(response, request, body)
            await response.wait_head()
        except BaseException:
            response.close()
            raise
        return response

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        for connection in list(self._all):
            connection.close()
        self._idle.clear()
        self._idle_count = 0
        self._all.clear()

    def keep(self, connection: Connection) -> None:
        if self._idle_count >= self.max_idle:
            connection.close()
            return
        connection.idle_since = self._clock()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._idle_count += 1

    def forget(self, connection: Connection) -> None:
        """A connection closed: it is no longer kept."""
        self._all.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1

    def _reuse(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = self._clock()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to expire
            self._idle_count -= 1
            if connection.lost or now - connection.idle_since > self.keepalive_expiry:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, origin: Origin) -> Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = Connection(self, origin, loop)
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = self._make_ssl_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: connection,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g} s") from exc
        except OSError as exc:  # DNS (gaierror), refused, TLS (SSLError), ...
            raise ConnectError(one_line(exc)) from exc
        self._all.add(connection)
        return connection


def _request_head(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """The request line and header block; a Content-Length when there is a body, or when
    the method expects one (as httpx does: some servers want `Content-Length: 0`)."""
    lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    # Names and values came from a parsed request or a validated option; a line end in
    # one would still smuggle a request into ours: each line holds one CRLF, no more.
    if (
        head.count(b"\n") != len(lines)
        or head.count(b"\r") != len(lines)
        or b"\0" in head
        or b" " in target
    ):
        raise LocalProtocolError("a header or the request target holds a line end or NUL")
    return head


def default_ssl_context() -> ssl.SSLContext:
    """TLS as httpx verifies it: certificates and host names checked against the CAs in
    `SSL_CERT_FILE` or `SSL_CERT_DIR` when set, else the system's (certifi's bundle, where
    installed, only if the system has none)."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = None if cafile else os.environ.get("SSL_CERT_DIR") or None
    context = ssl.create_default_context(cafile=cafile, capath=capath)
    if cafile is None and capath is None and not _system_has_cas():
        with contextlib.suppress(ImportError, OSError):
            import certifi  # httpx's dependency, so usually present

            context.load_verify_locations(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


def _system_has_cas() -> bool:
    paths = ssl.get_default_verify_paths()
    return bool(
        (paths.cafile and os.path.isfile(paths.cafile))
        or (paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))
    )
