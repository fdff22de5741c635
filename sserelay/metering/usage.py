"""What an upstream reported about a request's tokens: `Usage`, None-aware (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them. `None` means "not reported", which is not
    0: a gateway that turns a missing count into 0 (or a reported 0 into an estimate) bills
    wrong. Counts are taken verbatim, e.g. Anthropic's `input_tokens` excludes cache reads."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    #: input tokens read from the provider's prompt cache (OpenAI `cached_tokens`,
    #: Anthropic `cache_read_input_tokens`, Gemini `cachedContentTokenCount`)
    cached_tokens: int | None = None
    #: input tokens written to the prompt cache (Anthropic `cache_creation_input_tokens`)
    cache_creation_tokens: int | None = None
    #: output tokens spent reasoning (OpenAI `reasoning_tokens`, Gemini
    #: `thoughtsTokenCount`): billed as output, never streamed as text
    reasoning_tokens: int | None = None
    #: Anthropic counts cache reads and writes apart from `input_tokens`; OpenAI and
    #: Gemini count cached tokens inside it. How to read the counts, not a count: two
    #: reports of the same counts are equal whatever it says.
    input_excludes_cache: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, int | None]:
        """The three counts always (None: not reported), the cache and reasoning counts
        where reported."""
        out = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }
        for name in _EXTRAS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def merged(self, later: Usage) -> Usage:
        """`later`'s counts, field by field; a field `later` does not report keeps this one's.

        Every provider here reports running totals, so the last report wins and nothing is
        summed (Anthropic: input from `message_start`, output from the last `message_delta`)."""
        counts = [
            mine if theirs is None else theirs
            for mine, theirs in zip(_values(self), _values(later), strict=True)
        ]
        return _of(counts, self.input_excludes_cache or later.input_excludes_cache)

    @property
    def empty(self) -> bool:
        """Nothing reported at all."""
        return all(value is None for value in _values(self))

    @property
    def reported(self) -> bool:
        """The upstream said how many tokens it billed (input or output)."""
        return self.input_tokens is not None or self.output_tokens is not None

    def input_split(self) -> tuple[int, int]:
        """(uncached, cached) input tokens as billed: cache writes are billed as input."""
        cached = self.cached_tokens or 0
        if self.input_excludes_cache:
            return (self.input_tokens or 0) + (self.cache_creation_tokens or 0), cached
        return max((self.input_tokens or 0) - cached, 0), cached


_EXTRAS = ("cached_tokens", "cache_creation_tokens", "reasoning_tokens")
#: The counts a Usage holds, in order.
COUNTS = ("input_tokens", "output_tokens", "total_tokens", *_EXTRAS)


def _values(usage: Usage) -> list[int | None]:
    return [getattr(usage, name) for name in COUNTS]


def _of(counts: list[int | None], input_excludes_cache: bool = False) -> Usage:
    """A Usage of `counts`, in the order of COUNTS."""
    inputs, outputs, total, cached, creation, reasoning = counts
    return Usage(inputs, outputs, total, cached, creation, reasoning, input_excludes_cache)


def sum_usage(reports: Iterable[Usage]) -> Usage | None:
    """Per-field sums of several requests' usage; a field no request reported stays None
    (not 0); None when there is no report at all."""
    totals: list[int | None] | None = None
    for report in reports:
        values = _values(report)
        if totals is None:
            totals = values
            continue
        totals = [
            a if b is None else b if a is None else a + b
            for a, b in zip(totals, values, strict=True)
        ]
    return None if totals is None else _of(totals)
