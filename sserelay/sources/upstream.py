"""The upstream of `sserelay proxy`: one base URL, streamed with httpx.

`Upstream.open()` sends one request and returns as soon as the status line
and headers are in; `UpstreamResponse.chunks()` then yields the body as the
bytes arrive, with no buffering of our own. Closing the response, or
cancelling the task that reads it, tears the upstream connection down at once:
a response closed before its end is never returned to the pool (httpcore
closes a connection whose body was not read to the end), so the upstream sees
its socket close and can stop generating. Every failure becomes an
UpstreamError with a one-line message that never holds a secret.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

import httpx

from sserelay.errors import RequestError, UpstreamError, UpstreamTimeout

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
    request, replacing a client's header of the same name."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        timeouts: Timeouts = Timeouts(),
        transport: httpx.AsyncBaseTransport | None = None,
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
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=timeouts.connect,
                read=timeouts.read,
                write=timeouts.read,
                pool=timeouts.connect,
            ),
            # A gateway holds one upstream connection per open stream; no cap of its own.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            follow_redirects=False,
            transport=transport,
        )

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
        forwarded = [(n, v) for n, v in forwarded if n not in added]
        forwarded += self._added
        forwarded.append((b"accept-encoding", b"identity"))
        url = self.url_for(raw_path, query)
        request = self._client.build_request(method, url, headers=forwarded, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self, 0) from exc
        return UpstreamResponse(response, self)

    async def aclose(self) -> None:
        await self._client.aclose()


class UpstreamResponse:
    """An upstream answer whose body is still arriving."""

    def __init__(self, response: httpx.Response, upstream: Upstream) -> None:
        self._response = response
        self._upstream = upstream
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.bytes_received = 0
        # The body reaches the client decoded (see chunks()), so its coding goes, and
        # with it a length that counted the coded bytes.
        coded = response.headers.get("content-encoding", "identity").lower() != "identity"
        drop = (b"content-encoding", b"content-length") if coded else (b"content-encoding",)
        self.headers: Headers = end_to_end(response.headers.raw, drop=drop)

    @property
    def content_type(self) -> str:
        """The media type, lower-cased, without parameters (`text/event-stream`)."""
        value: str = self._response.headers.get("content-type", "")
        return value.partition(";")[0].strip().lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one chunk per read. Raises UpstreamError if
        the upstream dies, times out, or breaks the HTTP framing mid-body."""
        try:
            async for chunk in self._response.aiter_bytes():
                self.bytes_received += len(chunk)
                yield chunk
        except httpx.HTTPError as exc:
            raise _upstream_error(exc, self._upstream, self.bytes_received, True) from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        """Close the response now; if its body was not read to the end, the
        connection is closed too (not returned to the pool)."""
        await self._response.aclose()

    @property
    def closed(self) -> bool:
        return self._response.is_closed


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _upstream_error(
    exc: httpx.HTTPError, upstream: Upstream, received: int, mid_body: bool = False
) -> UpstreamError:
    """The one-line message for `exc`; the URL shown is redacted."""
    where = upstream.display
    host = upstream.base.host
    netloc = upstream.base.netloc.decode()
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamTimeout(
            f"upstream {netloc} did not accept a connection within "
            f"{upstream.timeouts.connect:g} s (connect timeout)"
        )
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
        what = f"after {received} bytes of the body" if mid_body else "before its response"
        return UpstreamTimeout(
            f"upstream {where} sent nothing for {upstream.timeouts.read:g} s {what} (read timeout)"
        )
    if isinstance(exc, httpx.ConnectError):
        if _cause(exc, socket.gaierror) is not None:
            return UpstreamError(f"cannot resolve upstream host {host!r} (DNS lookup failed)")
        if _cause(exc, ConnectionRefusedError) is not None:
            return UpstreamError(f"upstream {netloc} refused the connection")
        return UpstreamError(f"cannot connect to upstream {netloc}: {_one_line(exc)}")
    if mid_body:
        return UpstreamError(
            f"upstream {where} closed the connection mid-stream after {received} bytes "
            f"({_one_line(exc)})"
        )
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamError(f"upstream {where} closed the connection without answering")
    return UpstreamError(f"upstream {where} failed: {_one_line(exc)}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
