"""Tests for the sans-IO line splitter, `sserelay.wire.chunking`.

Lines end in LF, CRLF or a lone CR, the same three line ends SSE itself knows (WHATWG HTML
§9.2.5), and a CR and its LF may arrive in different reads. Bytes that are not UTF-8 become
U+FFFD and are counted, never fatal (DESIGN.md, "SSE rules the tests must prove").
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.wire.chunking import LineSplitter, decode_utf8

# --------------------------------------------------------------------------- helpers


def split_reads(reads: Iterable[bytes]) -> list[str]:
    """Feed `reads` to one fresh splitter, then end the input."""
    splitter = LineSplitter()
    lines: list[str] = []
    for data in reads:
        lines.extend(splitter.decode(data))
    lines.extend(splitter.flush())
    return lines


def split_all(data: bytes) -> list[str]:
    return split_reads([data])


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in pairwise(bounds)]


def expected_lines(data: bytes) -> list[str]:
    """Oracle: split on the three line ends; the piece after a final line end is no line."""
    pieces = re.split(rb"\r\n|\r|\n", data)
    if pieces[-1] == b"":  # the input ended with a line end (or was empty)
        pieces.pop()
    return [piece.decode("utf-8", errors="replace") for piece in pieces]


def invalid_bytes(raw: bytes) -> int:
    """Oracle: the bytes a strict UTF-8 decoder would have to drop."""
    return len(raw) - len(raw.decode("utf-8", errors="ignore").encode())


# --------------------------------------------------------------------------- line ends


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"a\nb\n", ["a", "b"]),
        (b"a\r\nb\r\n", ["a", "b"]),
        (b"a\rb\r", ["a", "b"]),
        (b"a\rb\r\nc\nd", ["a", "b", "c", "d"]),
        (b"a\n\r\nb", ["a", "", "b"]),  # LF then CRLF: an empty line between
        (b"a\r\rb", ["a", "", "b"]),  # two CRs: two line ends
        (b"a\n\rb", ["a", "", "b"]),  # LF CR is not a pair: two line ends
        (b"\n\n", ["", ""]),
        (b"\r\n", [""]),
        (b"\n", [""]),
        (b"", []),
        (b"no line end", ["no line end"]),
    ],
    ids=[
        "LF",
        "CRLF",
        "CR",
        "mixed",
        "LF-CRLF",
        "CR-CR",
        "LF-CR",
        "empty-lines",
        "only-CRLF",
        "only-LF",
        "nothing",
        "unterminated",
    ],
)
def test_line_ends_lf_crlf_and_cr(data: bytes, lines: list[str]) -> None:
    assert split_all(data) == lines
    assert lines == expected_lines(data)


@pytest.mark.parametrize(
    ("reads", "lines"),
    [
        ([b"a\r", b"\nb\n"], ["a", "b"]),
        ([b"a\r", b"\n"], ["a"]),
        ([b"a\r", b"\n", b"\n"], ["a", ""]),
        ([b"a\r", b"\r\n"], ["a", ""]),
        ([b"a\r", b"b"], ["a", "b"]),
        ([b"a\r\n\r", b"\nb"], ["a", "", "b"]),
        ([b"a\r", b"", b"\nb\n"], ["a", "b"]),  # an empty read between CR and LF changes nothing
        ([b"a\r", b"", b"", b"\n"], ["a"]),
    ],
    ids=[
        "CR|LF",
        "CR|LF-end",
        "CR|LF-LF",
        "CR|CRLF",
        "CR|text",
        "blank-CR|LF",
        "CR||LF",
        "CR|||LF",
    ],
)
def test_cr_and_its_lf_in_different_reads_are_one_line_end(
    reads: list[bytes], lines: list[str]
) -> None:
    assert split_reads(reads) == lines
    assert split_all(b"".join(reads)) == lines


def test_lines_come_out_as_soon_as_their_line_end_arrives() -> None:
    splitter = LineSplitter()
    assert splitter.decode(b"hel") == []
    assert splitter.decode(b"lo\nwor") == ["hello"]
    assert splitter.decode(b"ld\r") == ["world"]  # a CR ends the line at once
    assert splitter.decode(b"\n") == []  # its LF completes nothing new
    assert splitter.decode(b"") == []
    assert splitter.decode(b"\n") == [""]
    assert splitter.flush() == []


@pytest.mark.parametrize(
    ("data", "lines", "last"),
    [
        (b"a\nb", ["a"], ["b"]),
        (b"a\nb\n", ["a", "b"], []),
        (b"a\nb\r", ["a", "b"], []),
        (b"a\nb\r\n", ["a", "b"], []),
        (b"tail", [], ["tail"]),
        (b"", [], []),
    ],
)
def test_flush_returns_only_an_unterminated_last_line(
    data: bytes, lines: list[str], last: list[str]
) -> None:
    splitter = LineSplitter()
    assert splitter.decode(data) == lines
    assert splitter.flush() == last
    assert splitter.flush() == []  # flushing again finds nothing


def test_empty_lines_are_kept() -> None:
    assert split_all(b"\na\n\n\nb\n\n") == ["", "a", "", "", "b", ""]


def test_nul_bytes_pass_through() -> None:
    assert split_all(b"a\0b\n\0\n\0") == ["a\x00b", "\x00", "\x00"]


# --------------------------------------------------------------------------- split invariance

INPUTS = [
    b"one\ntwo\r\nthree\rfour",
    b"a\r\n\r\n\rb\n\r",
    b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\r\n\xe4\xb8\xad\xe6\x96\x87\n",
    b"\xff\xfe\n\xe2\x82\nok\xc3\r\n\xf0\x9f\x98",
    b"\x00\r\x00\n\n",
    b"\r",
    b"\n",
]
INPUT_IDS = ["mixed", "blank-lines", "multibyte-utf8", "invalid-utf8", "nul", "lone-CR", "lone-LF"]


@pytest.mark.parametrize("data", INPUTS, ids=INPUT_IDS)
def test_every_two_read_split_gives_the_same_lines(data: bytes) -> None:
    whole = split_all(data)
    assert whole == expected_lines(data)
    for cut in range(len(data) + 1):
        assert split_reads([data[:cut], data[cut:]]) == whole, cut


@pytest.mark.parametrize("data", INPUTS, ids=INPUT_IDS)
def test_byte_at_a_time_gives_the_same_lines(data: bytes) -> None:
    assert split_reads(data[i : i + 1] for i in range(len(data))) == split_all(data)


@pytest.mark.parametrize("data", INPUTS, ids=INPUT_IDS)
def test_every_split_counts_the_same_invalid_bytes(data: bytes) -> None:
    whole = LineSplitter()
    whole.decode(data)
    whole.flush()
    for cut in range(len(data) + 1):
        splitter = LineSplitter()
        splitter.decode(data[:cut])
        splitter.decode(data[cut:])
        splitter.flush()
        assert splitter.invalid_utf8_bytes == whole.invalid_utf8_bytes, cut


def test_multibyte_character_split_inside_is_whole() -> None:
    # "€" is E2 82 AC: every cut inside it must still give one "€", never U+FFFD
    assert split_reads([b"\xe2", b"\x82", b"\xac\n"]) == ["\u20ac"]
    assert split_reads([b"\xf0\x9f", b"\x98\x80"]) == ["\U0001f600"]


def inner_cuts(data: bytes) -> st.SearchStrategy[set[int]]:
    """Distinct split points strictly inside `data`, so no read is empty."""
    if len(data) < 2:
        return st.just(set())
    return st.sets(st.integers(min_value=1, max_value=len(data) - 1), max_size=12)


# bytes rich in line ends, multi-byte UTF-8 pieces and invalid bytes
LINE_BYTES = st.lists(
    st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b"\xc3\xa9", b"\xe2\x82\xac", b"\xff", b"\0"]),
    max_size=24,
).map(b"".join)


@given(data=st.binary(max_size=64) | LINE_BYTES, cuts=st.data())
def test_any_split_of_any_bytes_gives_re_split_lines(data: bytes, cuts: st.DataObject) -> None:
    reads = split_at(data, cuts.draw(inner_cuts(data), label="cuts"))
    splitter = LineSplitter()
    lines: list[str] = []
    for read in reads:
        lines.extend(splitter.decode(read))
    lines.extend(splitter.flush())
    assert lines == expected_lines(data)
    raw_lines = re.split(rb"\r\n|\r|\n", data)
    assert splitter.invalid_utf8_bytes == sum(invalid_bytes(raw) for raw in raw_lines)


# --------------------------------------------------------------------------- invalid UTF-8


@pytest.mark.parametrize(
    ("raw", "text", "invalid"),
    [
        (b"\xff\xfe", "\ufffd\ufffd", 2),
        (b"\xe2\x82", "\ufffd", 2),  # a truncated 3-byte sequence: one U+FFFD, both bytes counted
        (b"a\xe2\x82b", "a\ufffdb", 2),
        (b"\xf0\x9f\x98", "\ufffd", 3),  # a truncated 4-byte sequence
        (b"\xc3", "\ufffd", 1),
        (b"\x80", "\ufffd", 1),  # a lone continuation byte
        (b"\xc0\xaf", "\ufffd\ufffd", 2),  # overlong "/"
        (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd", 3),  # an encoded surrogate
        (b"ok\xffok\xfe", "ok\ufffdok\ufffd", 2),
    ],
)
def test_invalid_utf8_is_replaced_and_counted(raw: bytes, text: str, invalid: int) -> None:
    splitter = LineSplitter()
    assert splitter.decode(raw + b"\n") == [text]
    assert splitter.invalid_utf8_bytes == invalid
    # the same, as an unterminated last line
    splitter = LineSplitter()
    assert splitter.decode(raw) == []
    assert splitter.flush() == [text]
    assert splitter.invalid_utf8_bytes == invalid


def test_invalid_line_leaves_the_valid_lines_of_its_batch_alone() -> None:
    splitter = LineSplitter()
    assert splitter.decode(b"caf\xc3\xa9\n\xff\n\xe4\xb8\xad\r\n") == ["caf\u00e9", "\ufffd", "中"]
    assert splitter.invalid_utf8_bytes == 1


def test_invalid_bytes_are_counted_across_reads() -> None:
    splitter = LineSplitter()
    assert splitter.decode(b"\xff\n") == ["\ufffd"]
    assert splitter.decode(b"fine\n") == ["fine"]
    assert splitter.decode(b"\xe2\x82\nx\xfe") == ["\ufffd"]
    assert splitter.flush() == ["x\ufffd"]
    assert splitter.invalid_utf8_bytes == 4


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"", ("", 0)),
        (b"plain", ("plain", 0)),
        (b"caf\xc3\xa9 \xf0\x9f\x98\x80", ("caf\u00e9 \U0001f600", 0)),
        (b"\0", ("\x00", 0)),
        (b"\xef\xbb\xbfx", ("\ufeffx", 0)),  # a BOM is valid UTF-8 and kept
        (b"\xff", ("\ufffd", 1)),
        (b"\xff\xfe", ("\ufffd\ufffd", 2)),
        (b"\xe2\x82", ("\ufffd", 2)),
        (b"a\x80b\x80", ("a\ufffdb\ufffd", 2)),
        (b"\xed\xa0\x80", ("\ufffd\ufffd\ufffd", 3)),
        (b"\xf4\x90\x80\x80", ("\ufffd\ufffd\ufffd\ufffd", 4)),  # above U+10FFFF
    ],
)
def test_decode_utf8(raw: bytes, decoded: tuple[str, int]) -> None:
    assert decode_utf8(raw) == decoded
    assert decoded == (raw.decode("utf-8", errors="replace"), invalid_bytes(raw))


# --------------------------------------------------------------------------- long lines


def test_five_megabyte_line_in_64_kib_reads_is_whole_and_fast() -> None:
    # asyncio's StreamReader refuses lines over 64 KiB (DESIGN.md, "Known traps"); the splitter
    # keeps a long line as pieces and joins once, so this is linear, not quadratic.
    size, piece = 5 * 1024 * 1024, 64 * 1024
    line = bytes(range(ord("a"), ord("z") + 1)) * (size // 26 + 1)
    line = line[:size]
    splitter = LineSplitter()
    started = time.perf_counter()
    for start in range(0, size, piece):
        assert splitter.decode(line[start : start + piece]) == []
    lines = splitter.decode(b"\nnext")
    elapsed = time.perf_counter() - started
    assert len(lines) == 1
    assert lines[0] == line.decode()
    assert splitter.flush() == ["next"]
    assert elapsed < 0.5, f"{elapsed:.3f} s for a 5 MB line"
