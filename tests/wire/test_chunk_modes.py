"""`--chunk word` and `--chunk raw` (sserelay.wire.chunking), and token counts in every mode.

However the operating system splits the reads (down to a byte, inside a UTF-8 character or
a word), the chunks are the same and the tokens billed sum to `count_tokens` of the whole
text: the words and raw reads are counted over the joined text, a word split across two
reads being one token (DESIGN.md; issue 3, "Pacing and chunking").
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.metering.tokens import count_tokens, get_tokenizer
from sserelay.wire.chunking import (
    CHUNK_MODES,
    ReadSplitter,
    Utf8Stream,
    WordSplitter,
    decode_utf8,
    splitter_for,
)


def chunks_of(mode: str, reads: Iterable[bytes]) -> list[str]:
    splitter = splitter_for(mode)
    chunks: list[str] = []
    for data in reads:
        chunks.extend(splitter.decode(data))
    chunks.extend(splitter.flush())
    return chunks


def billed(mode: str, chunks: list[str], tokenizer: str = "whitespace") -> int:
    """Tokens as `serve` bills them: a line alone, words and reads over the joined text."""
    chosen = get_tokenizer(tokenizer)
    count = chosen.count if mode == "line" else chosen.counter().feed
    return sum(count(chunk) for chunk in chunks)


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


# Text with what makes splitting hard: multibyte characters, every line end, odd whitespace.
texts = st.text(alphabet=st.sampled_from(list("ab é€😀 \t\n\r\x1c\u2028\u3000.")), max_size=60).map(
    lambda s: s.encode()
)
any_bytes = st.binary(max_size=60)


@st.composite
def split_inputs(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    raw = draw(data)
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=12))
    return raw, split_at(raw, cuts)


# --------------------------------------------------------------------------- word


@pytest.mark.parametrize(
    ("reads", "chunks"),
    [
        ([b"Hello world"], ["Hello", " world"]),
        ([b"Hello world\n"], ["Hello", " world"]),  # whitespace after the last word: not sent
        ([b"  lead  and\n\ntrail  "], ["  lead", "  and", "\n\ntrail"]),
        ([b"hel", b"lo wor", b"ld"], ["hello", " world"]),
        ([b"one ", b"two"], ["one", " two"]),
        ([b"", b"   ", b""], []),
        ([b"caf\xc3", b"\xa9 ok"], ["caf\u00e9", " ok"]),
    ],
)
def test_word_chunks(reads: list[bytes], chunks: list[str]) -> None:
    assert chunks_of("word", reads) == chunks


def test_a_word_goes_out_when_the_whitespace_after_it_arrives() -> None:
    splitter = WordSplitter()
    assert splitter.decode(b"Hello") == []  # the word may go on
    assert splitter.decode(b" wor") == ["Hello"]
    assert splitter.decode(b"ld") == []
    assert splitter.decode(b"\n") == [" world"]
    assert splitter.flush() == []


@given(split_inputs(texts))
def test_word_chunks_do_not_depend_on_the_reads(case: tuple[bytes, list[bytes]]) -> None:
    raw, reads = case
    whole = chunks_of("word", [raw])
    assert chunks_of("word", reads) == whole
    text = raw.decode()
    # Every chunk is one word with the whitespace before it; together they are the text
    # without its trailing whitespace.
    assert "".join(whole) == text[: len(text.rstrip())]
    assert all(count_tokens(chunk) == 1 for chunk in whole)


def test_a_50_mb_word_in_small_reads_is_one_chunk_and_fast() -> None:
    word = b"x" * (50 * 1024 * 1024)
    splitter = WordSplitter()
    for start in range(0, len(word), 256 * 1024):
        assert splitter.decode(word[start : start + 256 * 1024]) == []
    assert [len(chunk) for chunk in splitter.decode(b" next ")] == [len(word), 5]


# --------------------------------------------------------------------------- raw


def test_raw_chunk_is_each_read_as_it_came() -> None:
    splitter = ReadSplitter()
    assert splitter.decode(b"a\n\ndata: evil") == ["a\n\ndata: evil"]
    assert splitter.decode(b" wo") == [" wo"]
    assert splitter.decode(b"rd\r\n") == ["rd\r\n"]
    assert splitter.flush() == []


def test_raw_holds_a_character_split_between_reads() -> None:
    euro = "\u20ac".encode()
    splitter = ReadSplitter()
    assert splitter.decode(b"x" + euro[:1]) == ["x"]
    assert splitter.decode(euro[1:2]) == []
    assert splitter.decode(euro[2:] + b"y") == ["\u20acy"]
    assert splitter.invalid_utf8_bytes == 0


def test_raw_truncated_character_at_the_end_is_replaced_and_counted() -> None:
    splitter = ReadSplitter()
    assert splitter.decode(b"ok\xe2\x82") == ["ok"]
    assert splitter.flush() == ["\ufffd"]
    assert splitter.invalid_utf8_bytes == 2


@given(split_inputs(texts))
def test_raw_chunks_join_to_the_text(case: tuple[bytes, list[bytes]]) -> None:
    raw, reads = case
    assert "".join(chunks_of("raw", reads)) == raw.decode()


# --------------------------------------------------------------------------- UTF-8


@given(split_inputs(any_bytes))
def test_utf8_stream_decodes_any_split_like_the_whole(case: tuple[bytes, list[bytes]]) -> None:
    raw, reads = case
    stream = Utf8Stream()
    text = "".join(stream.decode(data) for data in reads) + stream.flush()
    assert (text, stream.invalid_utf8_bytes) == decode_utf8(raw)


# --------------------------------------------------------------------------- tokens, every mode


@pytest.mark.parametrize("mode", CHUNK_MODES)
@given(case=split_inputs(texts))
def test_tokens_billed_are_count_tokens_of_the_whole_text_however_it_was_read(
    mode: str, case: tuple[bytes, list[bytes]]
) -> None:
    raw, reads = case
    chunks = chunks_of(mode, reads)
    assert billed(mode, chunks) == count_tokens(raw.decode())


@pytest.mark.parametrize("mode", CHUNK_MODES)
@given(case=split_inputs(any_bytes))
def test_tokens_of_any_bytes_are_those_of_the_replaced_text(
    mode: str, case: tuple[bytes, list[bytes]]
) -> None:
    raw, reads = case
    text, _ = decode_utf8(raw)
    assert billed(mode, chunks_of(mode, reads)) == count_tokens(text)


@pytest.mark.parametrize("mode", ["word", "raw"])
@given(case=split_inputs(texts))
def test_chars_tokenizer_bills_the_code_points_sent(
    mode: str, case: tuple[bytes, list[bytes]]
) -> None:
    _, reads = case
    chunks = chunks_of(mode, reads)
    assert billed(mode, chunks, "chars") == len("".join(chunks))


def test_a_word_split_across_reads_is_one_token_in_raw_mode() -> None:
    chunks = chunks_of("raw", [b"to", b"ken two"])
    assert chunks == ["to", "ken two"]
    counter = get_tokenizer("whitespace").counter()
    assert [counter.feed(chunk) for chunk in chunks] == [1, 1]


def test_unknown_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown chunk mode 'para'"):
        splitter_for("para")
