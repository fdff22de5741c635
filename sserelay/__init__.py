"""sserelay: relay text chunks as Server-Sent Events, counting every token."""

from __future__ import annotations

from .errors import ClientDisconnected, NoFlushError, SourceError, SSERelayError, UpstreamError
from .meter import Bill, ClientBill, Meter
from .sse import Event, SSEDecoder, encode_comment, encode_event
from .stream import EventSink, Frames, relay_frames, stream_sse
from .tokens import count_tokens, get_tokenizer, register_tokenizer

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
