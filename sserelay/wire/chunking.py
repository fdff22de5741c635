"""Split a byte stream into text chunks (one event each): sans-IO.

Three ways (`--chunk`), each a splitter with `decode(data) -> list[str]` for
the chunks a read completes and `flush() -> list[str]` at the end of input:

- `line` (LineSplitter): one chunk per line. Line ends are LF, CRLF or a lone
  CR (a CR at the end of one read and its LF at the start of the next are one
  line end) and are not part of the chunk.
- `word` (WordSplitter): one chunk per whitespace-delimited word, with the
  whitespace before it kept, as model deltas look (`"Hello"`, `" world"`).
- `raw` (ReadSplitter): one chunk per read, as it arrived.

Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal; a
character split across two reads is whole. A line or word may be any length:
one still being read is kept as a list of pieces, so a 50 MB line costs one
join, not a copy per read.
"""

from __future__ import annotations

import re
from typing import Protocol

#: The `--chunk` modes.
CHUNK_MODES = ("line", "word", "raw")


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """`raw` as text, and how many of its bytes were not valid UTF-8 (each
    maximal invalid run becomes one U+FFFD, as Python's 'replace' does)."""
    try:
        return raw.decode(), 0
    except UnicodeDecodeError:
        escaped = raw.decode("utf-8", errors="surrogateescape")
        invalid = sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
        return raw.decode("utf-8", errors="replace"), invalid


class LineSplitter:
    """`decode(data)` returns the lines that `data` completes; `flush()` returns
    the unterminated last line, if any. `invalid_utf8_bytes` counts replaced bytes."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._skip_lf = False  # the last read ended in CR; a leading LF completes that CRLF
        self.invalid_utf8_bytes = 0

    @property
    def pending(self) -> bool:
        """Whether part of a line (or a CR that an LF may complete) is held."""
        return self._skip_lf or bool(self._pieces)

    def decode(self, data: bytes) -> list[str]:
        if not data:  # nothing new: a pending CR still waits for its LF
            return []
        if self._skip_lf and data.startswith(b"\n"):
            data = data[1:]
        self._skip_lf = False
        if not data:
            return []
        if b"\n" not in data and b"\r" not in data:
            self._pieces.append(data)
            return []
        if self._pieces:
            self._pieces.append(data)
            data = b"".join(self._pieces)
            self._pieces = []
        raw_lines = data.splitlines()  # bytes.splitlines splits on LF, CRLF and CR only
        last = data[-1:]
        if last == b"\r":
            self._skip_lf = True
        elif last != b"\n":
            self._pieces.append(raw_lines.pop())
        return self._text(raw_lines)

    def flush(self) -> list[str]:
        """End of input: the last line, if it had no line end."""
        self._skip_lf = False
        if not self._pieces:
            return []
        raw = b"".join(self._pieces)
        self._pieces = []
        return self._text([raw])

    def _text(self, raw_lines: list[bytes]) -> list[str]:
        try:
            # The fast path: one decode for the whole batch.
            return b"\n".join(raw_lines).decode().split("\n") if raw_lines else []
        except UnicodeDecodeError:
            lines = []
            for raw in raw_lines:
                text, invalid = decode_utf8(raw)
                self.invalid_utf8_bytes += invalid
                lines.append(text)
            return lines


class Splitter(Protocol):
    """Turns reads into chunks; see the module docstring."""

    @property
    def invalid_utf8_bytes(self) -> int: ...

    def decode(self, data: bytes) -> list[str]: ...

    def flush(self) -> list[str]: ...


def _complete_prefix(data: bytes) -> int:
    """How much of `data` ends on a character boundary: a UTF-8 sequence cut
    short by the end of the read is left for the next read."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:  # ASCII: nothing pending
            return len(data)
        if byte >= 0xC0:  # a lead byte: does its whole sequence fit?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if back < need and byte < 0xF8 else len(data)
    return len(data)  # only continuation bytes: invalid, nothing to wait for


class Utf8Stream:
    """Incremental UTF-8: `decode(data)` returns the text of every character
    completed so far; `flush()` decodes what is left (a truncated character
    becomes U+FFFD). Any split of the input gives the same text and count of
    invalid bytes as decoding it whole with decode_utf8()."""

    def __init__(self) -> None:
        self._tail = b""
        self.invalid_utf8_bytes = 0

    def decode(self, data: bytes) -> str:
        if self._tail:
            data = self._tail + data
        cut = _complete_prefix(data)
        self._tail = data[cut:]
        return self._text(data if cut == len(data) else data[:cut])

    def flush(self) -> str:
        tail, self._tail = self._tail, b""
        return self._text(tail)

    def _text(self, raw: bytes) -> str:
        text, invalid = decode_utf8(raw)
        self.invalid_utf8_bytes += invalid
        return text


class ReadSplitter:
    """`--chunk raw`: each read is one chunk, as it came (minus a character
    that continues in the next read)."""

    def __init__(self) -> None:
        self._utf8 = Utf8Stream()

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._utf8.invalid_utf8_bytes

    def decode(self, data: bytes) -> list[str]:
        text = self._utf8.decode(data)
        return [text] if text else []

    def flush(self) -> list[str]:
        text = self._utf8.flush()
        return [text] if text else []


# str.split() and re's \s agree on what whitespace is (both use str.isspace).
_SPACE = re.compile(r"\s")
_WORD = re.compile(r"\s*\S+")


class WordSplitter:
    """`--chunk word`: one chunk per word with the whitespace before it.

    A word is complete once whitespace follows it, so a word split across reads
    is one chunk (sent when the read after it starts with whitespace, or at the
    end of input). Whitespace after the last word of the input is not sent."""

    def __init__(self) -> None:
        self._utf8 = Utf8Stream()
        self._pending: list[str] = []  # whitespace and the start of a word, not yet complete

    @property
    def invalid_utf8_bytes(self) -> int:
        return self._utf8.invalid_utf8_bytes

    def decode(self, data: bytes) -> list[str]:
        text = self._utf8.decode(data)
        if not _SPACE.search(text):  # no word can have ended here
            if text:
                self._pending.append(text)
            return []
        if self._pending:
            self._pending.append(text)
            text = "".join(self._pending)
        if text[-1].isspace():
            end = len(text.rstrip())
        else:  # the last word may go on in the next read
            head = text.rsplit(maxsplit=1)
            end = len(head[0]) if len(head) == 2 else 0
        self._pending = [text[end:]] if end < len(text) else []
        return _WORD.findall(text, 0, end)

    def flush(self) -> list[str]:
        text = "".join(self._pending) + self._utf8.flush()
        self._pending = []
        return _WORD.findall(text)


def splitter_for(mode: str) -> Splitter:
    """A fresh splitter for a `--chunk` mode (ValueError for an unknown one)."""
    if mode == "line":
        return LineSplitter()
    if mode == "word":
        return WordSplitter()
    if mode == "raw":
        return ReadSplitter()
    raise ValueError(f"unknown chunk mode {mode!r} (known: {', '.join(CHUNK_MODES)})")
