"""Split a byte stream into text chunks, one per line: sans-IO.

Line ends are LF, CRLF or a lone CR (a CR at the end of one read and its LF at
the start of the next are one line end). Line ends are not part of the chunk.
Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal.
A line may be any length: a line still being read is kept as a list of
pieces, so a 50 MB line costs one join, not a copy per read.
"""

from __future__ import annotations


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
