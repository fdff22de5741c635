"""The one exception hierarchy of sserelay.

    SSERelayError
    ├── ConfigError            a setting is invalid (an option, a price list, a keys file)
    ├── ListenError            the address could not be listened on
    ├── OutputError            a file sserelay writes (a recording) could not be written
    ├── SourceError            the input (file, stdin, FIFO) could not be opened or read
    ├── RecordingError         a recording is not one this version can read
    ├── UpstreamError          the upstream refused, timed out, failed or died mid-stream
    │   └── UpstreamTimeout    ... by not connecting or not sending within its timeout
    ├── NoFlushError           a sink that cannot flush was handed to stream_sse()
    ├── RequestError           a client's request is refused as sent (400)
    ├── ClientDisconnected     the client went away; carries what it had received
    ├── BudgetExhausted        the client's key ran out of budget mid-stream; carries the same
    └── Interrupted            the run was stopped (Ctrl-C, SIGTERM) while a stream was open

Each class says which bill reason it ends a stream with (`reason`, a `metering.Reason`
value, None where it is no stream's end), the way h11's errors carry a status hint: no code
maps exceptions to reasons by hand. A client that goes away is normal control flow, not a
failure: callers catch ClientDisconnected to bill the partial stream.
"""

from __future__ import annotations

from typing import ClassVar


class SSERelayError(Exception):
    """Base of every error sserelay raises on purpose."""

    #: The bill reason a stream ended by this error has (a `Reason` value), if any.
    reason: ClassVar[str | None] = None


class ConfigError(SSERelayError, ValueError):
    """A setting is invalid. `field` names it (a config field, e.g. `max_lag`), so the CLI
    can point at the option that set it; the message never holds a secret's value."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ListenError(SSERelayError):
    """The address could not be listened on (in use, not local, not resolvable)."""


class OutputError(SSERelayError):
    """A file sserelay writes (a recording) could not be opened or written."""


class SourceError(SSERelayError):
    """The chunk source could not be opened or read."""

    reason = "input_error"


class RecordingError(SourceError, ValueError):
    """Not a recording this version can read; the message names the line."""


class UpstreamError(SSERelayError):
    """The upstream could not be reached, answered with an error, or died mid-stream."""

    reason = "upstream_error"


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

    reason = "client_disconnected"

    def __init__(self, tokens: int) -> None:
        super().__init__(f"client disconnected after {tokens} tokens")
        self.tokens = tokens


class BudgetExhausted(SSERelayError):
    """The stream was cut because its key's budget is spent: the event that would have passed
    it was not sent. `tokens` is what it had been sent; `started` whether the response had
    begun (else it can still be answered with an error status)."""

    reason = "budget_exhausted"

    def __init__(self, tokens: int, *, started: bool = True) -> None:
        super().__init__(f"budget exhausted after {tokens} tokens")
        self.tokens = tokens
        self.started = started


class Interrupted(SSERelayError):
    """The run was stopped while the stream was open. `tokens` is what it had been sent."""

    reason = "interrupted"

    def __init__(self, tokens: int) -> None:
        super().__init__(f"interrupted after {tokens} tokens")
        self.tokens = tokens
