"""`Frames`: encoded SSE bytes and what they hold, the unit every stream writes and bills."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Frames:
    """Encoded bytes holding `events` events and `tokens` tokens, written in one flush.

    A Frames with no bytes carries tokens or events of bytes already written (a count
    that could only be known later, e.g. a last line with no line end): it is billed as is."""

    payload: bytes
    events: int
    tokens: int
