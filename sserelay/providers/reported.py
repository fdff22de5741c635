"""The usage each API reports, read from its report object: OpenAI's `usage` (Chat
Completions and Responses), Anthropic's, and the keys Ollama and Gemini use (pure).

A count is taken only when it is one (a non-negative integer); anything else is "not
reported" (None), never 0, so a bill never mistakes a missing figure for a free one.
"""

from __future__ import annotations

from typing import Any

from sserelay.metering.usage import Usage


def reported_count(value: object) -> int | None:
    """A reported token count: a non-negative integer (JSON may spell it `12.0`), else None."""
    if isinstance(value, bool):  # bool is an int subclass; `true` is no count
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def usage_from(
    report: object,
    input_key: str,
    output_key: str,
    total_key: str = "",
    *,
    cached: tuple[str, ...] = (),
    creation: str = "",
    reasoning: tuple[str, ...] = (),
    excludes_cache: bool = False,
) -> Usage | None:
    """The counts under these keys of `report` (`cached` and `reasoning` are paths into
    nested objects); None when it reports none (JSON null included)."""
    if not isinstance(report, dict):
        return None
    usage = Usage(
        reported_count(report.get(input_key)),
        reported_count(report.get(output_key)),
        reported_count(report.get(total_key)) if total_key else None,
        reported_count(value_at(report, cached)),
        reported_count(report.get(creation)) if creation else None,
        reported_count(value_at(report, reasoning)),
        excludes_cache,
    )
    return None if usage.empty else usage


def value_at(report: dict[str, Any], path: tuple[str, ...]) -> object:
    """The value at `path` in nested objects, or None."""
    value: object = report if path else None
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def openai_usage(report: object) -> Usage | None:
    return usage_from(
        report,
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        cached=("prompt_tokens_details", "cached_tokens"),
        reasoning=("completion_tokens_details", "reasoning_tokens"),
    )


def responses_usage(report: object) -> Usage | None:
    return usage_from(
        report,
        "input_tokens",
        "output_tokens",
        "total_tokens",
        cached=("input_tokens_details", "cached_tokens"),
        reasoning=("output_tokens_details", "reasoning_tokens"),
    )


def anthropic_usage(report: object) -> Usage | None:
    return usage_from(
        report,
        "input_tokens",
        "output_tokens",
        cached=("cache_read_input_tokens",),
        creation="cache_creation_input_tokens",
        excludes_cache=True,
    )
