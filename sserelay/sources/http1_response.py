"""One HTTP/1.1 exchange of `http1.Pool`: the response's head and body parsed by llhttp as
the connection delivers them, read piece by piece, with the read timeout and the pause of a
slow reader; and the errors of the client (the HTTP1Error family)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from .http1 import Connection

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
        "_express",
        "_head_only",
        "_loop",
        "_parser",
        "_paused",
        "_pieces",
        "_raised",
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

    def __init__(self, connection: Connection, method: bytes, read_timeout: float | None) -> None:
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
        self._express: Callable[[bytes], bool] | None = None
        self._raised: Exception | None = None
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

    def express(self, consume: Callable[[bytes], bool] | None) -> None:
        """Offer body bytes to `consume` as they arrive, from the connection's callback,
        while a reader waits in read() with nothing before them: True, it took them (the
        reader never sees them, and its read timeout starts again); False, they go to
        the reader as usual. An exception from it is raised by the waiting read(), and
        ends the offers. None stops them; so does the response's end or close."""
        self._express = consume

    # -- the reader's side ------------------------------------------------------------

    async def read(self) -> bytes:
        """The body bytes received since the last call, waiting for some if there are
        none; b"" once the body has ended (the connection is then back in the pool, or
        closed). Raises ReadTimeout, RemoteProtocolError, or CancelledError (after which
        the response should be closed)."""
        while True:
            if self._raised is not None:
                raise self._raised
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
        self._express = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reusable = self._reusable and self._state == _DONE and not self._body_until_close
        self._connection.finished(self, reusable)

    # -- the connection's side --------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the connection."""
        waiting = self._waiter is not None and not self._pieces
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(RemoteProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            if self._state == _DONE:
                self._reusable = False  # bytes after the end (or after `Connection: close`)
            else:
                self._fail(RemoteProtocolError(f"malformed HTTP response ({one_line(exc)})"))
        if self._pieces:
            if waiting and self._express is not None and self._offer():
                return  # taken: nobody is woken (an end or error read in it woke the reader)
            self._wake()
            if self._buffered > MAX_BUFFERED and not self._paused:
                self._paused = True
                self._connection.pause_reading()

    def _offer(self) -> bool:
        """Offer the pieces just parsed to the express consumer; True if it took them."""
        assert self._express is not None
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        try:
            taken = self._express(data)
        except Exception as exc:  # raised where the reader waits, as its own would be
            self._express = None
            self._raised = exc
            self._reusable = False
            self._wake()
            return True
        if taken:
            pieces.clear()
            self._buffered = 0
            if self._read_timeout is not None:
                self._wait_since = self._loop.time()  # bytes came: the wait starts again
        return taken

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
            detail += f": {one_line(exc)}"
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


def one_line(exc: BaseException) -> str:
    """An exception as one short line, for an error message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
