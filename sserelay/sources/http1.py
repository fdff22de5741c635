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

Errors are the HTTP1Error family below; they never leave `sources/`: `Upstream` turns
each into an UpstreamError with its one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable, Iterable
from typing import cast

import httptools

Origin = tuple[str, str, int]
"""(scheme, host, port) of a server: what one pool of connections is for."""

#: How long an idle connection may be reused (httpx's `keepalive_expiry`): servers close
#: idle ones after their own timeout (Node.js: 5 s), and a request sent on a connection the
#: server is closing fails.
KEEPALIVE_EXPIRY = 5.0
#: Idle connections kept per pool (httpx's `max_keepalive_connections` as sserelay set it).
MAX_IDLE = 32
#: Body bytes waiting for a slow reader before the socket is no longer read (the upstream
#: then feels TCP backpressure, as it would writing to the client).
MAX_BUFFERED = 256 * 1024


class HTTP1Error(Exception):
    """Something went wrong talking to a server. Never leaves `sources/`: `Upstream`
    turns each kind into an UpstreamError with its own message.

        HTTP1Error
        ├── ConnectError       no connection (DNS, refused, TLS, ...): `__cause__` says why
        ├── ConnectTimeout     no connection within the connect timeout
        ├── ReadTimeout        a reader waited the read timeout with nothing received
        ├── RemoteProtocolError  the server broke HTTP/1.1 (a malformed response)
        │   └── ServerDisconnected  the connection closed before the response's end
        └── LocalProtocolError   a request that cannot be sent (a CR or LF in a header)
    """


class ConnectError(HTTP1Error):
    pass


class ConnectTimeout(HTTP1Error):
    pass


class ReadTimeout(HTTP1Error):
    pass


class RemoteProtocolError(HTTP1Error):
    pass


class ServerDisconnected(RemoteProtocolError):
    pass


class LocalProtocolError(HTTP1Error):
    pass


# Where a response is.
_HEAD, _BODY, _DONE = 0, 1, 2


class Response:
    """One exchange on one connection: the head once `Pool.request()` returns, the body
    read piece by piece with `read()`. `close()` before the end closes the connection."""

    __slots__ = (
        "_body_until_close",
        "_buffered",
        "_connection",
        "_error",
        "_head_only",
        "_loop",
        "_parser",
        "_paused",
        "_pieces",
        "_read_timeout",
        "_reason",
        "_released",
        "_reusable",
        "_state",
        "_timer",
        "_wait_since",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, connection: _Connection, method: bytes, read_timeout: float | None) -> None:
        self._connection = connection
        self._loop = connection.loop
        self._parser = httptools.HttpResponseParser(self)
        self._read_timeout = read_timeout
        self._head_only = method == b"HEAD"
        self._state = _HEAD
        self._reason = b""
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._wait_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._error: HTTP1Error | None = None
        self._body_until_close = False
        self._reusable = True
        self._released = False
        #: The final status code (0 until the head is in).
        self.status = 0
        #: The response's header fields as the server sent them (names not lower-cased).
        self.headers: list[tuple[bytes, bytes]] = []

    @property
    def reason(self) -> str:
        """The status line's reason phrase, as sent (it may be empty)."""
        return self._reason.decode("latin-1").strip()

    @property
    def closed(self) -> bool:
        """True once the body was read to its end, or the response closed."""
        return self._released

    # -- the reader's side ------------------------------------------------------------

    async def read(self) -> bytes:
        """The body bytes received since the last call, waiting for some if there are
        none; b"" once the body has ended (the connection is then back in the pool, or
        closed). Raises ReadTimeout, RemoteProtocolError, or CancelledError (after which
        the response should be closed)."""
        while True:
            pieces = self._pieces
            if pieces:
                # One piece per read is the rule for a streamed answer: handed on as is.
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._connection.resume_reading()
                return data
            if self._state == _DONE:
                self._release()
                return b""
            if self._error is not None:
                raise self._error
            # _wait(), inlined: this is once per relayed event.
            loop = self._loop
            waiter = self._waiter = loop.create_future()
            if self._read_timeout is not None:
                self._wait_since = loop.time()
                if self._timer is None:
                    deadline = self._wait_since + self._read_timeout
                    self._timer = loop.call_at(deadline, self._timer_fired)
            try:
                await waiter
            finally:
                self._waiter = None

    async def wait_head(self) -> None:
        """Return once the final head (status and headers) is in."""
        while self._state == _HEAD:
            if self._error is not None:
                raise self._error
            await self._wait()

    def close(self) -> None:
        """Close the response now. Unless its body was complete (and the connection
        fit for another request), its connection is closed too."""
        if self._released:
            return
        if self._state != _DONE:
            self._reusable = False
        self._release()

    async def _wait(self) -> None:
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        timeout = self._read_timeout
        if timeout is not None:
            self._wait_since = loop.time()
            # One timer per connection, moved on lazily when it fires, instead of one
            # per wait: a wait is one per relayed read.
            if self._timer is None:
                self._timer = loop.call_at(self._wait_since + timeout, self._timer_fired)
        try:
            await waiter
        finally:
            self._waiter = None

    def _timer_fired(self) -> None:
        self._timer = None
        if self._waiter is None or self._read_timeout is None or self._released:
            return  # nobody waits: the next wait arms it again
        deadline = self._wait_since + self._read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._timer_fired)
            return
        self._fail(ReadTimeout(f"nothing received for {self._read_timeout:g} s"))
        self._reusable = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _release(self) -> None:
        """Hand the connection back (a whole exchange) or close it (anything else)."""
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reusable = self._reusable and self._state == _DONE and not self._body_until_close
        self._connection.finished(self, reusable)

    # -- the connection's side --------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the connection."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            if self._state == _DONE:
                self._reusable = False  # bytes after the end (or after `Connection: close`)
            else:
                self._fail(RemoteProtocolError(f"malformed HTTP response ({_one_line(exc)})"))
        if self._pieces:
            self._wake()
            if self._buffered > MAX_BUFFERED and not self._paused:
                self._paused = True
                self._connection.pause_reading()

    def lost(self, exc: BaseException | None) -> None:
        """The connection closed (`exc` None: the server closed it cleanly)."""
        self._reusable = False
        if self._state == _DONE:
            return
        if self._state == _BODY and self._body_until_close and exc is None:
            self._state = _DONE  # RFC 9112 §6.3: the close ends such a body
            self._wake()
            return
        if self._state == _HEAD:
            detail = "the server closed the connection without answering"
        elif self._body_until_close:
            detail = "the connection was reset"
        else:
            detail = "the body was not complete"
        if exc is not None:
            detail += f": {_one_line(exc)}"
        self._fail(ServerDisconnected(detail))

    def _fail(self, error: HTTP1Error) -> None:
        if self._error is None:
            self._error = error
        self._reusable = False
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            self._reusable = False  # a second answer to one request
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _HEAD:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._state != _HEAD:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.headers = []  # an interim answer (103 Early Hints): the final one follows
            return
        self.status = status
        if self._head_only:
            # A HEAD answer has no body whatever its headers say (RFC 9110 §9.3.2);
            # llhttp cannot be told, so the exchange ends here.
            self._state = _DONE
            self._reusable = self._reusable and self._parser.should_keep_alive()
        else:
            self._state = _BODY
            self._body_until_close = status not in (204, 304) and _until_close(self.headers)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._state == _BODY:
            self._pieces.append(body)
            self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._state == _BODY:
            self._state = _DONE
            # Asked now: llhttp forgets the message's framing once this returns.
            self._reusable = self._reusable and self._parser.should_keep_alive()
            self._wake()


def _until_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a body runs until the connection closes: neither chunked nor with a length."""
    for name, _ in headers:
        if name.lower() in (b"transfer-encoding", b"content-length"):
            return False
    return True


class _Connection(asyncio.Protocol):
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
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._all: set[_Connection] = set()

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

    def keep(self, connection: _Connection) -> None:
        if self._idle_count >= self.max_idle:
            connection.close()
            return
        connection.idle_since = self._clock()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._idle_count += 1

    def forget(self, connection: _Connection) -> None:
        """A connection closed: it is no longer kept."""
        self._all.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1

    def _reuse(self, origin: Origin) -> _Connection | None:
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

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        connection = _Connection(self, origin, loop)
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
            raise ConnectError(_one_line(exc)) from exc
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
