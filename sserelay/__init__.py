"""sserelay: relay text chunks as Server-Sent Events, counting every token.

The library entry is `run(config)`: `ServeConfig`, `MockConfig` or `ProxyConfig` in, a
`RunResult` (the bill, the run's error, the signal that ended it) out; the `sserelay`
command is its user. The streaming contract (`stream_sse`, `relay_frames`, `Meter`, `Bill`,
the SSE codec) is importable without the HTTP stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sserelay.errors import (
    ClientDisconnected,
    ConfigError,
    NoFlushError,
    SourceError,
    SSERelayError,
    UpstreamError,
)
from sserelay.metering.bill import Bill, ClientBill
from sserelay.metering.meter import Meter, MeterObserver
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import count_tokens, get_tokenizer, register_tokenizer
from sserelay.metering.usage import Usage
from sserelay.streaming.stream import EventSink, relay_frames, stream_sse
from sserelay.wire.frames import Frames
from sserelay.wire.sse import Event, SSEDecoder, encode_comment, encode_event

if TYPE_CHECKING:
    from sserelay.http.config import MockConfig, ProxyConfig, ServeConfig
    from sserelay.http.limits import RequestLimits
    from sserelay.http.run import RunResult, run

__version__ = "0.1.0"

#: Names that bring the HTTP stack (starlette, uvicorn, httpx) with them: imported when
#: first used, so `import sserelay` (and `sserelay --version`) stays fast.
_LAZY = {
    "MockConfig": "sserelay.http.config",
    "ProxyConfig": "sserelay.http.config",
    "RequestLimits": "sserelay.http.limits",
    "RunResult": "sserelay.http.run",
    "ServeConfig": "sserelay.http.config",
    "run": "sserelay.http.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sserelay' has no attribute {name!r}")


__all__ = [
    "Bill",
    "ClientBill",
    "ClientDisconnected",
    "ConfigError",
    "Event",
    "EventSink",
    "Frames",
    "Meter",
    "MeterObserver",
    "MockConfig",
    "NoFlushError",
    "ProxyConfig",
    "Reason",
    "RequestLimits",
    "RunResult",
    "SSEDecoder",
    "SSERelayError",
    "ServeConfig",
    "SourceError",
    "UpstreamError",
    "Usage",
    "__version__",
    "count_tokens",
    "encode_comment",
    "encode_event",
    "get_tokenizer",
    "register_tokenizer",
    "relay_frames",
    "run",
    "stream_sse",
]
