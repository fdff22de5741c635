"""Tokenizers: how many billable tokens a text holds.

The default, `whitespace`, counts whitespace-delimited words: `count_tokens(s)
== len(s.split())`. Streams arrive in fragments, so every tokenizer also has a
stateful `TokenCounter` that counts over the joined text: a word split across
two fragments is one token, billed with the fragment where it starts.

`o200k_base` and `cl100k_base` are OpenAI's BPE encodings (`sserelay.metering.bpe`), made on
first lookup: loading a vocabulary takes a fraction of a second, too slow for every import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


def count_tokens(text: str) -> int:
    """Whitespace-delimited token count: `len(text.split())`."""
    return len(text.split())


class TokenCounter(Protocol):
    """Counts tokens over a text that arrives in fragments."""

    def feed(self, fragment: str) -> int:
        """Tokens that start in `fragment`, given every fragment fed before."""
        ...

    def pending(self) -> int:
        """Tokens held back that `flush()` would bill if the text ended now (not billed yet)."""
        ...

    def flush(self) -> int:
        """Bill what was held back as the end of the text, and start over with an empty text."""
        ...


class WhitespaceCounter:
    """Counts a token where a non-space follows a space (or the start of the text)."""

    def __init__(self) -> None:
        self._in_word = False

    def feed(self, fragment: str) -> int:
        if not fragment:
            return 0
        starts = len(fragment.split())
        if starts and self._in_word and not fragment[0].isspace():
            starts -= 1  # the first word continues the previous fragment's last word
        self._in_word = not fragment[-1].isspace()
        return starts

    def pending(self) -> int:
        return 0  # a word is billed where it starts: nothing is ever held back

    def flush(self) -> int:
        self._in_word = False
        return 0


class CharCounter:
    """Counts every Unicode code point, line ends included."""

    def feed(self, fragment: str) -> int:
        return len(fragment)

    def pending(self) -> int:
        return 0

    def flush(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """A named way of counting tokens. `count` is for whole texts, `counter()`
    starts a fresh count over a fragmented text."""

    name: str
    description: str
    count: Callable[[str], int]
    counter: Callable[[], TokenCounter]
    #: Whether its counter holds tokens back (`pending()` can be more than 0): a BPE
    #: count does, a word or character count never does (and is not asked).
    holds_back: bool = False


def _count_chars(text: str) -> int:
    return len(text)


_REGISTRY: dict[str, Tokenizer] = {}
#: Tokenizers made (and then registered) on their first lookup by name.
_FACTORIES: dict[str, Callable[[], Tokenizer]] = {}


def register_tokenizer(tokenizer: Tokenizer) -> None:
    """Make `tokenizer` selectable by name (`--tokenizer NAME`)."""
    _REGISTRY[tokenizer.name] = tokenizer


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name`; KeyError lists the known names.

    The first lookup of a BPE tokenizer loads its vocabulary (and may raise
    `sserelay.metering.bpe.TokenizerUnavailable`): look it up before streaming."""
    tokenizer = _REGISTRY.get(name)
    if tokenizer is not None:
        return tokenizer
    factory = _FACTORIES.get(name)
    if factory is None:
        raise KeyError(f"unknown tokenizer {name!r} (known: {', '.join(tokenizer_names())})")
    tokenizer = factory()
    register_tokenizer(tokenizer)
    return tokenizer


def tokenizer_names() -> list[str]:
    """Every name `--tokenizer` takes, `auto` included."""
    return sorted({*_REGISTRY, *_FACTORIES, AUTO})


#: `--tokenizer auto`: the encoding of each request's model (see tokenizer_for).
AUTO = "auto"


def tokenizer_for(
    name: str, model: str | None = None, *, load: bool = True
) -> tuple[Tokenizer, bool]:
    """The tokenizer that counts a request for `model` under `--tokenizer NAME`, and
    whether its count is an estimate. A named tokenizer counts every request. `auto` picks
    OpenAI's encoding of the model (o200k_base for gpt-4o, gpt-4.1, gpt-5, o1-o4;
    cl100k_base for gpt-4, gpt-3.5) and o200k_base, as an estimate, for any other model
    (Claude, Llama, Gemini: their vendors' tokenizers are not public).

    With `load` false, a tokenizer not loaded yet is a LookupError instead of a load (which
    takes a second: the caller then loads it off the event loop)."""
    if name == AUTO:
        from sserelay.metering.encodings import encoding_for_model

        name, estimate = encoding_for_model(model)
    else:
        estimate = False
    if not load and name not in _REGISTRY:
        raise LookupError(f"tokenizer {name!r} is not loaded yet")
    return get_tokenizer(name), estimate


def _bpe_tokenizer(name: str, description: str) -> Callable[[], Tokenizer]:
    def make() -> Tokenizer:
        # Imported here, not at the top: `sserelay --version` must not pay for the BPE module.
        from sserelay.metering.bpe import load_encoding

        encoding = load_encoding(name)
        return Tokenizer(
            name,
            f"{description} ({encoding.backend})",
            encoding.count,
            encoding.counter,
            holds_back=True,
        )

    return make


register_tokenizer(
    Tokenizer("whitespace", "whitespace-delimited words", count_tokens, WhitespaceCounter)
)
register_tokenizer(Tokenizer("chars", "Unicode code points", _count_chars, CharCounter))
_FACTORIES["o200k_base"] = _bpe_tokenizer("o200k_base", "OpenAI BPE: gpt-4o, gpt-4.1, gpt-5, o1-o4")
_FACTORIES["cl100k_base"] = _bpe_tokenizer("cl100k_base", "OpenAI BPE: gpt-4, gpt-3.5")
