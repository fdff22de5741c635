"""What an upstream reported about a request's tokens: `Usage`, None-aware (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the upstream reported them. `None` means "not reported", which is not
    0: a gateway that turns a missing count into 0 (or a reported 0 into an estimate) bills
    wrong. Counts are taken verbatim, e.g. Anthropic's `input_tokens` excludes cache reads."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }

    def merged(self, later: Usage) -> Usage:
        """`later`'s counts, field by field; a field `later` does not report keeps this one's.

        Every provider here reports running totals, so the last report wins and nothing is
        summed (Anthropic: input from `message_start`, output from the last `message_delta`)."""
        return Usage(
            *(
                mine if theirs is None else theirs
                for mine, theirs in zip(_values(self), _values(later), strict=True)
            )
        )

    @property
    def empty(self) -> bool:
        """Nothing reported at all."""
        return all(value is None for value in _values(self))


def _values(usage: Usage) -> list[int | None]:
    return [getattr(usage, field.name) for field in fields(usage)]


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
    return None if totals is None else Usage(*totals)
