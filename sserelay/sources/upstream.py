"""The upstream of `sserelay proxy`: one base URL, streamed over HTTP/1.1 (`http1.py`).

`Upstream.open()` sends one request and returns as soon as the status line
and headers are in; `UpstreamResponse.chunks()` then yields the body as the
bytes arrive, with no buffering of our own. Closing the response, or
cancelling the task that reads it, tears the upstream connection down at once:
a response closed before its end is never returned to the pool, so the
upstream sees its socket close and can stop generating. Every failure becomes
an UpstreamError with a one-line message that never holds a secret.

httpx parses the URLs only; requests go through `http1.Pool`, whose docstring
says what it does not do that httpx did (HTTP proxies from the environment,
HTTP/2, br and zstd bodies). A gzip or deflate body (sserelay asks for
`identity`, but an upstream may code it anyway) is decoded here, as httpx did.
"""

from __future__ import annotations

import base64
import errno
import re
import socket
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from sserelay.errors import RequestError, UpstreamError, UpstreamTimeout
from sserelay.sources.http1 import (
    ConnectError,
    ConnectTimeout,
    HTTP1Error,
    Pool,
    ReadTimeout,
    Response,
    ServerDisconnected,
)

DEFAULT_CONNECT_TIMEOUT = 10.0
#: Models may think for minutes before their first byte; a read timeout is for dead upstreams.
DEFAULT_READ_TIMEOUT = 300.0

#: RFC 9110 §7.6.1: hop-by-hop fields, never forwarded (plus any the Connection field names).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

Headers = list[tuple[bytes, bytes]]


def end_to_end(headers: Iterable[tuple[bytes, bytes]], drop: Iterable[bytes] = ()) -> Headers:
    """`headers` without the hop-by-hop ones, those the Connection field lists, and `drop`.

    Names are compared case-insensitively; the ones kept are lower-cased."""
    pairs = [(name.lower(), value) for name, value in headers]
    dropped = set(HOP_BY_HOP).union(name.lower() for name in drop)
    for name, value in pairs:
        if name == b"connection":
            dropped.update(token.strip().lower() for token in value.split(b","))
    return [(name, value) for name, value in pairs if name not in dropped]


_ENCODED_DOT = re.compile(rb"%2e", re.IGNORECASE)
#: Where an upstream may see a separator that sserelay does not: an encoded slash or
#: backslash it decodes, a backslash it reads as a slash (Windows, some routers).
_HIDDEN_SLASH = re.compile(rb"%2f|%5c|\\", re.IGNORECASE)


def resolve_dot_segments(path: bytes) -> bytes:
    """`path` (a request's raw path) with its `.` and `..` segments resolved as
    RFC 3986 §5.2.4 (remove_dot_segments) says, `%2e` read as a dot, since nginx
    and most servers decode it before they resolve; other segments stay as sent.

    RequestError if a `..` climbs above the root (the path would leave whatever
    it is joined to, as nginx refuses it), or if a segment hides a dot segment
    that an upstream may find where sserelay does not: behind `%2F` or `%5C`
    (which nginx and many frameworks decode into separators), a backslash, or a
    `;parameter` (`..;x`, which Java servers read as `..`). Otherwise `%2F` is
    data in its segment, as RFC 3986 §3.3 has it, and passes as sent; so does
    anything encoded twice (`%252e`)."""
    absolute = path.startswith(b"/")
    segments = (path[1:] if absolute else path).split(b"/")
    resolved: list[bytes] = []
    for i, segment in enumerate(segments):
        dots = _ENCODED_DOT.sub(b".", segment)
        if dots in (b".", b".."):
            if dots == b"..":
                if not resolved:
                    raise RequestError("the path climbs above its root with '..'")
                resolved.pop()
            if i == len(segments) - 1:
                resolved.append(b"")  # `/a/b/..` is `/a/`
            continue
        for piece in _HIDDEN_SLASH.split(dots):
            if piece.partition(b";")[0] in (b".", b".."):
                raise RequestError(
                    "a path segment hides a dot segment behind an encoded slash, "
                    "a backslash or a ';'"
                )
        resolved.append(segment)
    return (b"/" if absolute else b"") + b"/".join(resolved)


def parse_header(line: str) -> tuple[str, str]:
    """`'Name: value'` as (name, value); ValueError (without the value) if it is not one."""
    name, colon, value = line.partition(":")
    name = name.strip()
    # The message never shows the value (nor a line without a colon): it may be a key.
    if not colon or not name or any(c in name for c in " \t\r\n"):
        raise ValueError("expected 'Name: value' (the header is not shown: it may hold a key)")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"the value of header {name!r} holds a line end or NUL")
    return name, value.strip()


def redact_url(url: httpx.URL) -> str:
    """The URL as it may be printed: no user info and no query (keys live there)."""
    return str(url.copy_with(userinfo=b"", query=None, fragment=None))


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT


class Upstream:
    """A streaming upstream at `base_url`; one connection pool for every request.

    `headers` ('Name', 'value' pairs, e.g. the real API key) are added to every
    request, replacing a client's header of the same name. User info in the URL
    (`https://user:pass@host/`) becomes a Basic `Authorization`, as httpx sent it."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        timeouts: Timeouts = Timeouts(),
    ) -> None:
        if any(c.isspace() for c in base_url):
            raise ValueError("expected an http:// or https:// URL with a host (no spaces)")
        if "://" not in base_url:  # `localhost:11434`, as curl takes it: http://
            base_url = "http://" + base_url
        try:
            self.base = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if self.base.scheme not in ("http", "https") or not self.base.host:
            raise ValueError("expected an http:// or https:// URL with a host")
        self.display = redact_url(self.base)
        self.timeouts = timeouts
        self._added = [(name.lower().encode(), value.encode()) for name, value in headers]
        # Sent last: it replaces an added Authorization, as httpx's BasicAuth did.
        self._auth: Headers = []
        if self.base.username or self.base.password:
            credentials = f"{self.base.username}:{self.base.password}".encode()
            self._auth = [(b"authorization", b"Basic " + base64.b64encode(credentials))]
        port = self.base.port or (443 if self.base.scheme == "https" else 80)
        self._origin = (self.base.scheme, self.base.raw_host.decode("ascii"), port)
        self._host = self.base.netloc  # no user info; the port only if not the default
        # A gateway holds one upstream connection per open stream; no cap of its own.
        self._pool = Pool(connect_timeout=timeouts.connect, read_timeout=timeouts.read)

    @property
    def secrets(self) -> list[str]:
        """Values that must never be printed: the added headers, the URL's key material."""
        values = [value.decode() for _, value in self._added]
        values += [v for _, v in self.base.params.multi_items() if len(v) >= 8]
        if self.base.password:
            values.append(self.base.password)
        return [v for v in values if v]

    def doubled_prefix(self, raw_path: bytes) -> bool:
        """Whether a client's path starts with the upstream URL's own path again
        (`/v1/chat/completions` sent to `--upstream http://host/v1`): a client whose base
        URL also ends in `/v1` reaches `/v1/v1/...`."""
        base_path = self.base.raw_path.partition(b"?")[0].rstrip(b"/")
        return bool(base_path) and (raw_path + b"/").startswith(base_path + b"/")

    @property
    def ignored_proxy(self) -> str | None:
        """The environment variable (`HTTPS_PROXY`, `ALL_PROXY`, ...) naming an HTTP proxy
        for this upstream, which httpx went through and sserelay does not; None if none
        applies (unset, or `NO_PROXY` names the host)."""
        proxies = urllib.request.getproxies_environment()
        # NO_PROXY's rules; in urllib.request since Python 3.0, not in typeshed.
        bypass: Callable[[str, dict[str, str]], bool]
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        for scheme in (self.base.scheme, "all"):
            if scheme in proxies and not bypass(self.base.host, proxies):
                return f"{scheme.upper()}_PROXY"
        return None

    def url_for(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """The upstream URL for a client's path and query: `/` is the base URL
        itself, any other path is appended to the base path; queries are joined.

        The client's dot segments are resolved first (resolve_dot_segments()); a
        path that would leave the base path that way is a RequestError."""
        base_path = self.base.raw_path.partition(b"?")[0]
        raw_path = resolve_dot_segments(raw_path)
        if raw_path in (b"", b"/"):
            path = base_path
        else:
            path = base_path.rstrip(b"/") + (
                raw_path if raw_path.startswith(b"/") else b"/" + raw_path
            )
        queries = [q for q in (self.base.query, query) if q]
        if queries:
            path += b"?" + b"&".join(queries)
        return self.base.copy_with(raw_path=path)

    async def open(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send the request; return once the upstream's status and headers arrived.

        `headers` are the client's; hop-by-hop ones, Host and Content-Length are
        replaced, and the body is asked for uncompressed (the meter reads it)."""
        forwarded = end_to_end(
            headers,
            drop=(b"host", b"content-length", b"accept-encoding", b"expect", b"te"),
        )
        added = {name for name, _ in self._added}
        forwarded = [(b"host", self._host), *((n, v) for n, v in forwarded if n not in added)]
        forwarded += self._added
        if self._auth:
            forwarded = [(n, v) for n, v in forwarded if n != b"authorization"] + self._auth
        forwarded.append((b"accept-encoding", b"identity"))
        target = self.url_for(raw_path, query).raw_path
        try:
            response = await self._pool.request(
                self._origin, method.encode("ascii"), target, forwarded, body
            )
        except HTTP1Error as exc:
            raise _upstream_error(exc, self, 0) from exc
        try:
            return UpstreamResponse(response, self)
        except UpstreamError:
            response.close()
            raise

    async def aclose(self) -> None:
        await self._pool.aclose()


class UpstreamResponse:
    """An upstream answer whose body is still arriving."""

    def __init__(self, response: Response, upstream: Upstream) -> None:
        self._response = response
        self._upstream = upstream
        self.status = response.status
        self.reason = response.reason
        self.bytes_received = 0
        fields = [(name.lower(), value) for name, value in response.headers]
        self._content_type = next((v for n, v in fields if n == b"content-type"), b"")
        codings = b",".join(v for n, v in fields if n == b"content-encoding")
        self._decoder = _decoder_for(codings.decode("latin-1"), upstream)
        # The body reaches the client decoded (see chunks()), so its coding goes, and
        # with it a length that counted the coded bytes.
        coded = self._decoder is not None
        drop = (b"content-encoding", b"content-length") if coded else (b"content-encoding",)
        self.headers: Headers = end_to_end(fields, drop=drop)

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters (`text/event-stream`)."""
        return self._content_type.decode("latin-1").partition(";")[0].strip().lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one chunk per read. Raises UpstreamError if
        the upstream dies, times out, or breaks the HTTP framing mid-body."""
        read = self._response.read
        decoder = self._decoder
        try:
            while True:
                try:
                    chunk = await read()
                except HTTP1Error as exc:
                    raise _upstream_error(exc, self._upstream, self.bytes_received, True) from exc
                if not chunk:
                    if decoder is not None and (tail := decoder.flush()):
                        self.bytes_received += len(tail)
                        yield tail
                    return
                if decoder is not None:
                    chunk = decoder.decode(chunk)
                    if not chunk:
                        continue
                self.bytes_received += len(chunk)
                yield chunk
        finally:
            self._response.close()

    def express(self, consume: Callable[[bytes], bool]) -> bool:
        """Offer each piece of the body to `consume` as it arrives, from the connection's
        callback, whenever the reader of chunks() waits with nothing before it (see
        `Response.express`): True, it took the piece (chunks() never yields it); False, the
        piece goes to chunks() as usual. Returns False, offering nothing, for a body with
        a content coding (chunks() decodes it)."""
        if self._decoder is not None:
            return False

        def offer(data: bytes) -> bool:
            if consume(data):
                self.bytes_received += len(data)
                return True
            return False

        self._response.express(offer)
        return True

    async def aclose(self) -> None:
        """Close the response now; if its body was not read to the end, the
        connection is closed too (not returned to the pool)."""
        self._response.close()

    @property
    def closed(self) -> bool:
        return self._response.closed


class _Decoder:
    """gzip and deflate content codings undone, as httpx's `GZipDecoder` and
    `DeflateDecoder` did: a deflate body is zlib-wrapped (RFC 9110 §8.4.1.2) or, from
    some servers, raw; the first bytes tell."""

    def __init__(self, codings: list[str], upstream: Upstream) -> None:
        self._codings = codings  # in the order they were applied
        self._upstream = upstream
        self._stages: list[Any] = [
            zlib.decompressobj(zlib.MAX_WBITS | 16) if coding != "deflate" else None
            for coding in reversed(codings)
        ]

    def decode(self, data: bytes) -> bytes:
        try:
            for i, stage in enumerate(self._stages):
                if stage is None:
                    stage = self._stages[i] = zlib.decompressobj()
                    try:
                        data = stage.decompress(data)
                        continue
                    except zlib.error:
                        stage = self._stages[i] = zlib.decompressobj(-zlib.MAX_WBITS)
                data = stage.decompress(data)
        except zlib.error as exc:
            raise self._error(exc) from exc
        return data

    def flush(self) -> bytes:
        data = b""
        try:
            for stage in self._stages:
                if stage is not None:
                    data = stage.decompress(data) + stage.flush()
        except zlib.error as exc:
            raise self._error(exc) from exc
        return data

    def _error(self, exc: zlib.error) -> UpstreamError:
        coding = ", ".join(self._codings)
        return UpstreamError(
            f"upstream {self._upstream.display} sent a body in {coding} coding that does not "
            f"decode ({_one_line(exc)})"
        )


def _decoder_for(header: str, upstream: Upstream) -> _Decoder | None:
    """The decoder for a Content-Encoding value; UpstreamError for a coding we cannot
    undo (sserelay asked for identity: an upstream that sends br or zstd anyway)."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    unknown = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
    if unknown:
        raise UpstreamError(
            f"upstream {upstream.display} sent a body in {unknown[0]!r} coding, which "
            "sserelay cannot decode (it asked for identity)"
        )
    return _Decoder(codings, upstream)


def _upstream_error(
    exc: HTTP1Error, upstream: Upstream, received: int, mid_body: bool = False
) -> UpstreamError:
    """The one-line message for `exc`; the URL shown is redacted."""
    where = upstream.display
    host = upstream.base.host
    netloc = upstream.base.netloc.decode()
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(
            f"upstream {netloc} did not accept a connection within "
            f"{upstream.timeouts.connect:g} s (connect timeout)"
        )
    if isinstance(exc, ReadTimeout):
        what = f"after {received} bytes of the body" if mid_body else "before its response"
        return UpstreamTimeout(
            f"upstream {where} sent nothing for {upstream.timeouts.read:g} s {what} (read timeout)"
        )
    if isinstance(exc, ConnectError):
        cause = exc.__cause__
        if isinstance(cause, socket.gaierror):
            return UpstreamError(f"cannot resolve upstream host {host!r} (DNS lookup failed)")
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return UpstreamError(f"upstream {netloc} refused the connection")
        return UpstreamError(f"cannot connect to upstream {netloc}: {_one_line(exc)}")
    if isinstance(exc, ServerDisconnected):
        if mid_body:
            return UpstreamError(
                f"upstream {where} closed the connection mid-stream after {received} bytes "
                f"({_one_line(exc)})"
            )
        return UpstreamError(f"upstream {where} closed the connection without answering")
    if mid_body:
        return UpstreamError(
            f"upstream {where} broke the HTTP framing mid-stream after {received} bytes "
            f"({_one_line(exc)})"
        )
    return UpstreamError(f"upstream {where} failed: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
