"""Run the app on uvicorn, programmatically, with sserelay owning the signals.

uvicorn's own handling re-raises SIGINT after shutdown and waits for open
streams to finish; a relay must instead end its streams now, bill, and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import signal
import socket
import struct
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from sserelay.errors import ListenError, SSERelayError
from sserelay.http.limits import RequestLimits

T = TypeVar("T")

#: After a 414 or 431, what the client still sends is read and dropped this long, so it
#: reads the answer rather than a reset (a close with unread data sends RST).
REFUSAL_LINGER = 2.0


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(), on uvloop where it is installed (uvicorn[standard] brings it
    on Linux and macOS): measured 2-8% more events/s, more with many clients."""
    # Everything imported so far lives as long as the process: freeze it out of
    # the collector's scans, and collect the young generation less often. A
    # full collection over 1,000 clients' objects stalls every stream at once;
    # measured at fan-out, lag p99 went from ~38 ms to ~18 ms.
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = (
            " (another server is using it; try --port 0)" if exc.errno == errno.EADDRINUSE else ""
        )
        raise ListenError(
            f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()}{hint}"
        ) from exc
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


class _HeadRefused(SSERelayError):
    """Raised in a parser callback to stop httptools once a head is refused (never escapes)."""


def _refusal(status: int, limits: RequestLimits) -> tuple[bytes, str]:
    """The answer to a refused head: its status's reason phrase, and what was over which
    bound."""
    if status == 414:
        return b"URI Too Long", f"the request URL is over {limits.line_bytes} bytes"
    return (
        b"Request Header Fields Too Large",
        f"the request head is over its bounds ({limits.headers} header lines of at most "
        f"{limits.line_bytes} bytes, {limits.head_bytes} bytes in all)",
    )


class _HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus two ASGI extensions: `sserelay.abort`, whose
    `abort()` closes the connection at once with a reset, and `sserelay.connection`, whose
    `open()` says whether the connection still takes what is sent and whose
    `write(body)` writes a piece of the response body straight to the transport
    (_Connection), and whose `ready()` says whether `write` would take one now.

    A client that stops reading leaves a write waiting on a full socket; a
    plain close would wait for that data to drain, forever. The hub's
    slow-client cut-off needs the hard close; ASGI itself has none.

    It also bounds each request head (`limits`, a RequestLimits: 414 or 431,
    then close) and the time it may take to arrive (`limits.head_timeout`, from
    the connection or the head's first bytes: close). The timer runs only while a
    head is unfinished, so an established stream pays nothing for it. `limits` is
    set on a subclass per run (see `serve_app`): uvicorn makes the protocol itself."""

    limits = RequestLimits()
    # Per connection, in slots rather than the instance dict: uvicorn's protocol keeps 28
    # attributes there, and CPython shares one dict layout among a class's instances only
    # up to 30 keys; past that every connection pays for a dict of its own (1.5 KiB).
    __slots__ = ("_head_bytes", "_head_timer", "_headers_seen", "_in_head", "_refused")
    _in_head: bool  # the next bytes belong to a request head (not to a body)
    _head_bytes: int
    _headers_seen: int
    _refused: bool
    _head_timer: asyncio.TimerHandle | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head, self._head_bytes, self._headers_seen = True, 0, 0
        self._refused = False
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a 414 or 431: read and dropped
        if not self._in_head:  # a body
            super().data_received(data)
            return
        if self._head_timer is None:  # a head begins (also a stray CRLF between requests)
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)
        # httptools holds an unfinished header whole in memory: it is fed a head no
        # further than its bound. (A head that starts in the read that ends a body may
        # take that one read more.)
        room = self.limits.head_bytes - self._head_bytes
        part = data if len(data) <= room else data[:room]
        self._head_bytes += len(part)
        super().data_received(part)
        if len(part) == len(data) or self._refused or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(431)
        else:  # the head ended within its bound: the rest is its body or the next request
            self.data_received(data[len(part) :])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"sserelay.abort": {"abort": self._abort}}
        self._headers_seen = 0

    def on_url(self, url: bytes) -> None:
        # llhttp hands the URL over in pieces, at least one per read.
        if len(self.url) + len(url) > self.limits.line_bytes:
            self._refuse(414)
            raise _HeadRefused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_seen += 1
        limits = self.limits
        if self._headers_seen > limits.headers or len(name) + len(value) > limits.line_bytes:
            self._refuse(431)
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()
        # uvicorn's send() writes at once, or drops the write if the connection is gone:
        # asked right after a send, `open()` says which, with no turn of the event loop
        # (the sink would otherwise yield once per flush to learn of a disconnect).
        connection = _Connection(self.cycle)
        self.scope["extensions"]["sserelay.connection"] = {
            "open": connection.open,
            "write": connection.write,
            "ready": connection.ready,
        }

    def on_message_complete(self) -> None:
        self._in_head = True  # what comes next is the next request's head
        self._head_bytes = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # A head refused in a callback stops httptools with an error; it has its answer.
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self, status: int) -> None:
        """Answer `status` with connection: close; drop what the client still sends
        for REFUSAL_LINGER seconds (or until it closes), then close."""
        self._refused = True
        self._disarm_head_timer()
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier (pipelined) request's response is still being written.
            transport.close()
            return
        phrase, message = _refusal(status, self.limits)
        body = f"sserelay: {message}\n".encode()
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, phrase, len(body), body)
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._head_timer = self.loop.call_later(REFUSAL_LINGER, transport.close)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.transport.close()

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _abort(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                # Linger 0: the close sends RST and drops the unsent data.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class _Connection:
    """The `sserelay.connection` extension of one request: its methods are the
    extension's `open()` and `write(body)` (one small object in slots: a closure and a
    partial took twice the memory of each idle stream)."""

    __slots__ = ("cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle

    def open(self) -> bool:
        """Whether the connection still takes what is sent."""
        return not self.cycle.disconnected

    def ready(self) -> bool:
        """Whether `write(body)` would take a piece now (the connection there, the response
        started and chunked, not complete, the transport not paused). Nothing can change
        that before the next turn of the loop."""
        cycle = self.cycle
        return (
            not cycle.disconnected
            and bool(cycle.chunked_encoding)
            and cycle.response_started
            and not cycle.response_complete
            and not cycle.flow.write_paused
        )

    def write(self, body: bytes) -> bool | None:
        """The next piece of a started chunked response, handed to the transport now. True
        once the transport took it; False if the connection is gone (nothing was written);
        None where it cannot be done here (the response is not started, not chunked, or
        complete, or the transport asked to pause writing): send it with ASGI `send`
        instead, which waits to drain.

        uvicorn's send() does the same (its chunk framing, its disconnected check) under
        starlette's and uvicorn's wrappers; for a relayed event the ASGI chain was a third
        of the proxy's CPU, and skipping it measured 71 -> 47 us of CPU per event (issue
        17)."""
        cycle = self.cycle
        if cycle.disconnected:
            return False
        if (
            not cycle.chunked_encoding
            or not cycle.response_started
            or cycle.response_complete
            or cycle.flow.write_paused
        ):
            return None
        if body:  # an empty chunk would end the response
            cycle.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
        return True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # sserelay installs its own handlers (see serve_app); uvicorn's would
        # re-raise the signal after shutdown and end the process with a traceback.
        yield


async def serve_app(
    app: Any,
    sock: socket.socket,
    *,
    finished: asyncio.Event,
    on_signal: Callable[[int], None] | None,
    on_ready: Callable[[], None] = lambda: None,
    limits: RequestLimits | None = None,
) -> None:
    """Serve `app` on `sock` until `finished` is set, then shut down promptly.

    SIGINT and SIGTERM call `on_signal`, which is expected to end the open
    streams and set `finished`; a second signal stops at once. With `on_signal`
    None, the signals are left to whoever runs the event loop. `on_ready` runs
    once the signal handlers are in place, so a signal after it is never lost. `limits`
    bounds each request (the defaults of RequestLimits when None)."""
    protocol = _HttpProtocol
    if limits is not None and limits != _HttpProtocol.limits:

        class _Bounded(_HttpProtocol):
            pass

        _Bounded.limits = limits
        protocol = _Bounded
    config = uvicorn.Config(
        app,
        http=protocol,
        # Said, not guessed: uvicorn takes an app that is a plain function (one that hands
        # over an awaitable, as Monitor.wrap's does) for ASGI 2.
        interface="asgi3",
        ws="none",  # no WebSocket routes; skips importing a websockets stack
        lifespan="off",
        log_level="critical",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []

    signums = () if on_signal is None else (signal.SIGINT, signal.SIGTERM)

    def handle(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            server.force_exit = True
        assert on_signal is not None
        on_signal(signum)

    for signum in signums:
        loop.add_signal_handler(signum, handle, signum)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    ending = asyncio.create_task(finished.wait())
    try:
        on_ready()
        await asyncio.wait({serving, ending}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving
    finally:
        ending.cancel()
        for signum in signums:
            loop.remove_signal_handler(signum)
