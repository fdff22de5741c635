"""Tests for the tokenizers, `sserelay.metering.tokens`.

The contract (DESIGN.md, "The core contract"): `count_tokens(s) == len(s.split())`, i.e. words
delimited by whatever `str.split()` calls whitespace, Unicode spaces included. A stream arrives
in fragments, so the stateful counters must bill the joined text exactly, whatever the split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.metering import tokens
from sserelay.metering.tokens import (
    CharCounter,
    Tokenizer,
    WhitespaceCounter,
    count_tokens,
    get_tokenizer,
    register_tokenizer,
    tokenizer_names,
)

# --------------------------------------------------------------------------- helpers


def feed_all(fragments: list[str], counter: tokens.TokenCounter) -> list[int]:
    """What `counter` bills for each fragment, in order."""
    return [counter.feed(fragment) for fragment in fragments]


def word_starts_per_fragment(fragments: list[str]) -> list[int]:
    """Oracle: how many words of the joined text start inside each fragment."""
    joined = "".join(fragments)
    starts = [match.start() for match in re.finditer(r"\S+", joined)]
    assert len(starts) == count_tokens(joined)  # re's \s and str.split() agree
    billed: list[int] = []
    offset = 0
    for fragment in fragments:
        end = offset + len(fragment)
        billed.append(sum(1 for start in starts if offset <= start < end))
        offset = end
    return billed


# Whitespace-heavy text, with the Unicode spaces str.split() honours and two look-alikes it
# does not (U+200B ZERO WIDTH SPACE, U+FEFF), so word boundaries fall everywhere.
WORDY = st.text(
    st.sampled_from(["a", "b", "中", "😀", " ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u200b"]),
    max_size=12,
)

# --------------------------------------------------------------------------- count_tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        (" ", 0),
        ("   ", 0),
        ("\t\n\r\v\f", 0),
        ("one", 1),
        ("one two", 2),
        ("  one   two  ", 2),
        ("one\ttwo\nthree\r\nfour\rfive", 5),
        ("a\u3000b", 2),  # IDEOGRAPHIC SPACE
        ("a\u00a0b", 2),  # NO-BREAK SPACE: str.split() treats it as whitespace
        ("a\u2003b\u2028c\u0085d", 4),  # EM SPACE, LINE SEPARATOR, NEXT LINE
        ("a\x1cb\x1fc", 3),  # the ASCII separators FS and US are whitespace to str.split()
        ("\u3000\u00a0", 0),
        ("a\u200bb", 1),  # ZERO WIDTH SPACE is not whitespace
        ("a\ufeffb", 1),  # nor is BOM / ZERO WIDTH NO-BREAK SPACE
        ("中文没有空格", 1),  # CJK has no spaces: one "word"
        ("中文 日本語", 2),
        ("😀", 1),
        ("😀 👍🏽 👨‍👩‍👧", 3),  # a ZWJ family is one word
        ("hello,world", 1),  # punctuation does not split
    ],
)
def test_count_tokens_is_len_of_str_split(text: str, expected: int) -> None:
    assert count_tokens(text) == expected
    assert count_tokens(text) == len(text.split())


@given(st.text())
def test_count_tokens_is_len_of_str_split_for_any_text(text: str) -> None:
    assert count_tokens(text) == len(text.split())


# --------------------------------------------------------------------------- WhitespaceCounter

TEXTS = [
    "hello world",
    "  leading and trailing  ",
    "one\ttwo\nthree\r\nfour",
    "a\u3000b\u00a0c d\u200be",
    "中文 日本語 😀👍 x",
    "",
    "   ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_every_two_fragment_split_sums_to_count_tokens(text: str) -> None:
    for cut in range(len(text) + 1):
        fragments = [text[:cut], text[cut:]]
        billed = feed_all(fragments, WhitespaceCounter())
        assert sum(billed) == count_tokens(text), cut
        assert billed == word_starts_per_fragment(fragments), cut


@pytest.mark.parametrize("text", TEXTS)
def test_one_character_at_a_time_sums_to_count_tokens(text: str) -> None:
    billed = feed_all(list(text), WhitespaceCounter())
    assert sum(billed) == count_tokens(text)
    assert billed == word_starts_per_fragment(list(text))


@pytest.mark.parametrize(
    ("fragments", "billed"),
    [
        (["hel", "lo world"], [1, 1]),
        (["hello", " world"], [1, 1]),
        (["hello ", "world"], [1, 1]),
        (["he", "ll", "o"], [1, 0, 0]),
        (["a b", "c d"], [2, 1]),  # "bc" starts in the first fragment
        (["a ", " ", "b"], [1, 0, 1]),
        (["中文", "日本"], [1, 0]),
        (["😀", "👍"], [1, 0]),
        (["a\u3000", "b"], [1, 1]),
        (["a\u200b", "b"], [1, 0]),  # ZERO WIDTH SPACE joins the fragments into one word
        (["word", "\n"], [1, 0]),
    ],
)
def test_word_split_across_fragments_is_billed_where_it_starts(
    fragments: list[str], billed: list[int]
) -> None:
    assert feed_all(fragments, WhitespaceCounter()) == billed
    assert billed == word_starts_per_fragment(fragments)


@pytest.mark.parametrize(
    "fragments",
    [["hel", "lo world"], ["a ", "b", " c"], ["x"], ["中", "文 字"]],
)
def test_empty_fragments_change_nothing(fragments: list[str]) -> None:
    expected = feed_all(fragments, WhitespaceCounter())
    counter = WhitespaceCounter()
    with_empties: list[int] = [counter.feed("")]
    for fragment in fragments:
        with_empties.append(counter.feed(fragment))
        with_empties.append(counter.feed(""))
    assert with_empties[1::2] == expected
    assert with_empties[0::2] == [0] * (len(fragments) + 1)


@given(st.lists(WORDY, max_size=8))
def test_any_fragments_sum_to_count_tokens_of_the_joined_text(fragments: list[str]) -> None:
    billed = feed_all(fragments, WhitespaceCounter())
    assert sum(billed) == count_tokens("".join(fragments))
    assert billed == word_starts_per_fragment(fragments)


@given(st.lists(st.text(), max_size=6))
def test_any_unicode_fragments_sum_to_count_tokens(fragments: list[str]) -> None:
    assert sum(feed_all(fragments, WhitespaceCounter())) == count_tokens("".join(fragments))


# --------------------------------------------------------------------------- CharCounter


@given(st.lists(st.text(), max_size=6))
def test_char_counter_sums_to_len_of_the_joined_text(fragments: list[str]) -> None:
    billed = feed_all(fragments, CharCounter())
    assert billed == [len(fragment) for fragment in fragments]
    assert sum(billed) == len("".join(fragments))


def test_char_counter_counts_code_points_and_line_ends() -> None:
    assert feed_all(["a\r\n", "", "中😀", "\u3000"], CharCounter()) == [3, 0, 2, 1]


# --------------------------------------------------------------------------- registry


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A copy of the registry for one test: what a test registers is gone afterwards."""
    # tokens has no public unregister; the module functions read `_REGISTRY` at call time.
    monkeypatch.setattr(tokens, "_REGISTRY", dict(tokens._REGISTRY))
    yield


@pytest.mark.parametrize(
    ("name", "text", "count"),
    [
        ("whitespace", "two  words\u3000more", 3),
        ("chars", "two  words", 10),
        ("chars", "中😀\n", 3),
    ],
)
def test_get_tokenizer_by_name(name: str, text: str, count: int) -> None:
    tokenizer = get_tokenizer(name)
    assert tokenizer.name == name
    assert tokenizer.description
    assert tokenizer.count(text) == count
    assert sum(feed_all([text[:3], text[3:]], tokenizer.counter())) == count


def test_whitespace_tokenizer_is_count_tokens_with_fresh_counters() -> None:
    tokenizer = get_tokenizer("whitespace")
    assert tokenizer.count is count_tokens
    first, second = tokenizer.counter(), tokenizer.counter()
    assert first is not second
    assert first.feed("hel") == 1
    assert second.feed("lo") == 1  # a fresh counter: no word in progress


def test_unknown_tokenizer_is_a_key_error_naming_the_known_ones() -> None:
    with pytest.raises(KeyError) as excinfo:
        get_tokenizer("tiktoken")
    message = excinfo.value.args[0]
    assert "'tiktoken'" in message
    for known in tokenizer_names():
        assert known in message


class LineCounter:
    """A custom counter for the registry test: one token per fragment holding a newline."""

    def feed(self, fragment: str) -> int:
        return fragment.count("\n")

    def pending(self) -> int:
        return 0

    def flush(self) -> int:
        return 0


def test_register_tokenizer_adds_a_custom_one() -> None:
    custom = Tokenizer("lines", "newline count", lambda text: text.count("\n"), LineCounter)
    with pytest.MonkeyPatch.context() as patch:
        # tokens has no public unregister; the module functions read `_REGISTRY` at call time.
        patch.setattr(tokens, "_REGISTRY", dict(tokens._REGISTRY))
        register_tokenizer(custom)
        assert get_tokenizer("lines") is custom
        assert "lines" in tokenizer_names()
        assert get_tokenizer("lines").count("a\nb\n") == 2
        assert get_tokenizer("lines").counter().feed("x\n") == 1
        with pytest.raises(KeyError, match="lines"):
            get_tokenizer("nope")  # the error names the new one too
    # cleaned up: later tests see only the built-in tokenizers
    assert "lines" not in tokenizer_names()
    with pytest.raises(KeyError):
        get_tokenizer("lines")


@pytest.mark.usefixtures("scratch_registry")
def test_tokenizer_names_are_sorted() -> None:
    assert {"chars", "whitespace"} <= set(tokenizer_names())
    register_tokenizer(Tokenizer("aaa", "first by name", count_tokens, WhitespaceCounter))
    register_tokenizer(Tokenizer("zzz", "last by name", count_tokens, WhitespaceCounter))
    names = tokenizer_names()
    assert names == sorted(names)
    assert names[0] == "aaa"
    assert names[-1] == "zzz"
