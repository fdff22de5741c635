"""sserelay: relay text chunks as Server-Sent Events, counting every token."""

from __future__ import annotations

from sserelay.errors import (
    ClientDisconnected,
    NoFlushError,
    SourceError,
    SSERelayError,
    UpstreamError,
)
from sserelay.metering.meter import Bill, ClientBill, Meter
from sserelay.metering.tokens import count_tokens, get_tokenizer, register_tokenizer
from sserelay.streaming.stream import EventSink, Frames, relay_frames, stream_sse
from sserelay.wire.sse import Event, SSEDecoder, encode_comment, encode_event

__version__ = "0.1.0"

__all__ = [
    "Bill",
    "ClientBill",
    "ClientDisconnected",
    "Event",
    "EventSink",
    "Frames",
    "Meter",
    "NoFlushError",
    "SSEDecoder",
    "SSERelayError",
    "SourceError",
    "UpstreamError",
    "__version__",
    "count_tokens",
    "encode_comment",
    "encode_event",
    "get_tokenizer",
    "register_tokenizer",
    "relay_frames",
    "stream_sse",
]
