"""Per-model prices for the proxy's bill, read from a TOML price list (`--prices FILE`).

The file maps a model name to its input and output price, in currency per 1M tokens:

    ["gpt-4o-mini"]
    input = 0.15
    output = 0.60

    [claude-sonnet-4-5]
    input = 3
    output = 15

A model reported as `gpt-4o-mini-2024-07-18` matches `gpt-4o-mini` (the longest listed name
it starts with), since providers answer with dated snapshots of the model that was asked for.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass


class PriceListError(ValueError):
    """The price list is not valid TOML of the documented shape."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Currency per 1M tokens, for the prompt (input) and the answer (output)."""

    input: float
    output: float


class PriceList:
    """Model name → ModelPrice, looked up exactly, then by longest prefix."""

    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self.prices = dict(prices)

    @classmethod
    def from_toml(cls, text: str) -> PriceList:
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PriceListError(f"not valid TOML: {exc}") from exc
        prices: dict[str, ModelPrice] = {}
        for model, entry in table.items():
            if not isinstance(entry, dict):
                raise PriceListError(
                    f"[{model}] must be a table with input and output prices per 1M tokens"
                )
            values: list[float] = []
            for side in ("input", "output"):
                value = entry.get(side, 0.0)
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise PriceListError(f"[{model}] {side} must be a number >= 0")
                values.append(float(value))
            unknown = set(entry) - {"input", "output"}
            if unknown:
                raise PriceListError(f"[{model}] has unknown keys: {', '.join(sorted(unknown))}")
            prices[model] = ModelPrice(values[0], values[1])
        return cls(prices)

    def for_model(self, model: str | None) -> ModelPrice | None:
        """The price of `model`: an exact entry, else the longest entry it starts with."""
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        prefixes = [name for name in self.prices if model.startswith(name)]
        return self.prices[max(prefixes, key=len)] if prefixes else None
