"""The one exception hierarchy of sserelay.

    SSERelayError
    ├── SourceError            the input (file, stdin) could not be opened or read
    ├── UpstreamError          the upstream refused, timed out, failed or died mid-stream
    │   └── UpstreamTimeout    ... by not connecting or not sending within its timeout
    ├── NoFlushError           a sink that cannot flush was handed to stream_sse()
    ├── RequestError           a client's request is refused as sent (400)
    └── ClientDisconnected     the client went away; carries what it had received

A client that goes away is normal control flow, not a failure: callers catch
ClientDisconnected to bill the partial stream.
"""

from __future__ import annotations


class SSERelayError(Exception):
    """Base of every error sserelay raises on purpose."""


class SourceError(SSERelayError):
    """The chunk source could not be opened or read."""


class UpstreamError(SSERelayError):
    """The upstream could not be reached, answered with an error, or died mid-stream."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not accept a connection, or sent nothing, within its timeout."""


class RequestError(SSERelayError):
    """A client's request that sserelay refuses as sent (answered 400): a proxied path
    that would leave the upstream's base path."""


class NoFlushError(SSERelayError):
    """The sink handed to stream_sse() has no flush(): events would sit in a buffer."""

    def __init__(self) -> None:
        super().__init__("sserelay: response writer does not support flushing")


class ClientDisconnected(SSERelayError):
    """The client went away mid-stream. `tokens` is what it had been sent until then."""

    def __init__(self, tokens: int) -> None:
        super().__init__(f"client disconnected after {tokens} tokens")
        self.tokens = tokens
