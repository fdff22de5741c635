"""Why a stream, a request or a whole run ended: the bill's `reason`."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A bill's reason. A StrEnum: it is its value wherever a string is expected, so the
    bill's JSON and every comparison with a plain string stay as they were."""

    #: the stream ended and the client got all of it
    COMPLETE = "complete"
    #: the client went away before the end
    CLIENT_DISCONNECTED = "client_disconnected"
    #: Ctrl-C or SIGTERM ended the run
    INTERRUPTED = "interrupted"
    #: the upstream refused, failed or died mid-stream
    UPSTREAM_ERROR = "upstream_error"
    #: the input (a file, stdin, a command) could not be read
    INPUT_ERROR = "input_error"
    #: the client fell too far behind and was cut off
    SLOW_CLIENT = "slow_client"
    #: the client's key ran out of budget (mid-stream, or before it started)
    BUDGET_EXHAUSTED = "budget_exhausted"
    #: the client's key is over its rate limit
    RATE_LIMITED = "rate_limited"
    #: no key, or an unknown one
    UNAUTHORIZED = "unauthorized"
    #: the key may not use what it asked for (a model not on its list)
    FORBIDDEN = "forbidden"
    #: the instance that served it died; its last checkpoint is what is known
    CRASHED = "crashed"


#: Every reason, as the strings the bill writes.
REASONS: tuple[str, ...] = tuple(reason.value for reason in Reason)
