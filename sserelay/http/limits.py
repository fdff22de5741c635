"""What one request may send before sserelay refuses it (`--max-line-bytes`,
`--max-head-bytes`, `--max-headers`, `--head-timeout`, `--max-body-bytes`).

uvicorn's httptools protocol bounds neither a request head's size nor the time it takes to
arrive: without bounds one connection grows the process without limit before any
authentication, and half-sent requests hold descriptors for ever. The defaults: nginx and
Apache allow about 8 KiB per line, Node.js 16 KiB in all; a gateway's keys and tokens fit
well within them, and a model's request body (a long conversation, images as base64) within
64 MiB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sserelay.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on a request. Past `line_bytes` the request line is a 414 and a header line a
    431; past `head_bytes` (request line and headers) or `headers` header lines, a 431; both
    then close the connection. A head not complete `head_timeout` seconds after the
    connection (or its first byte) came closes the connection. A request body over
    `body_bytes` is a 413 (the mock and the proxy read one; a stream does not)."""

    line_bytes: int = 16 * 1024
    head_bytes: int = 64 * 1024
    headers: int = 100
    head_timeout: float = 10.0
    body_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("line_bytes", "head_bytes", "headers", "body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{value!r} is not a whole number of at least 1", name)
        if self.line_bytes > self.head_bytes:
            raise ConfigError(
                f"a line of {self.line_bytes} bytes would not fit a head of "
                f"{self.head_bytes} bytes",
                "line_bytes",
            )
        timeout = self.head_timeout
        if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigError(f"{timeout!r} is not a number of seconds over 0", "head_timeout")
