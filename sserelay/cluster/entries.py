"""The entries of a topic's Redis stream: how a batch of events is written into one, and
read back.

An entry of the stream (all fields bytes):

    k   the number of its first event (events are numbered 1, 2, ... without a gap, so a
        reader that finds a jump knows it missed some: trimmed while it was away)
    c   its events' texts joined by "\n" (none holds one), or, when one does,
    j   its events' texts as a JSON list
    t   each event's tokens: little-endian unsigned 32-bit numbers
    p   what the token count holds back after its last event (a BPE count's open tail)

and the end of a stream, `k` (the number the next event would have), `e` (its error, ''
if none) and `x` (the tokens counted at the end).
"""

from __future__ import annotations

import array
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

#: Stream entries as redis-py gives them (bytes in, bytes out).
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def encode_chunks(chunks: Sequence[str]) -> tuple[str, str]:
    """The field and value an entry keeps `chunks` in: `c`, joined by line ends, unless a
    chunk holds one; then `j`, a JSON list (slower: a line per event is the common case)."""
    joined = "\n".join(chunks)
    if joined.count("\n") == len(chunks) - 1:
        return "c", joined
    return "j", json.dumps(list(chunks), ensure_ascii=False)


def decode_chunks(fields: dict[bytes, bytes]) -> list[str]:
    if b"c" in fields:
        return fields[b"c"].decode().split("\n")
    chunks = json.loads(fields[b"j"])
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise ValueError("j is not a list of texts")
    return chunks


def encode_tokens(tokens: Sequence[int]) -> bytes:
    numbers = array.array("I", tokens)  # 'I' is 32 bits wherever Python runs
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tobytes()


def decode_tokens(data: bytes) -> list[int]:
    numbers = array.array("I")
    numbers.frombytes(data)
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tolist()


@dataclass(slots=True)
class Item:
    """A batch of events (or, `events` 0, the end) ready to publish: as the publisher's hub
    takes it, and as the script does (`field` and `text`: the chunks encoded; `counts`: the
    tokens encoded; for the end, `text` is its error, '' if none)."""

    events: int
    chunks: Sequence[str]
    tokens: Sequence[int]
    pending: int
    field: str
    text: str
    counts: bytes
    end_tokens: int = 0

    @classmethod
    def batch(cls, chunks: Sequence[str], tokens: Sequence[int], pending: int) -> Item:
        field, text = encode_chunks(chunks)
        return cls(len(chunks), chunks, tokens, pending, field, text, encode_tokens(tokens))

    @classmethod
    def end(cls, error: str | None, end_tokens: int = 0) -> Item:
        return cls(0, (), (), 0, "", error or "", str(end_tokens).encode(), end_tokens)
