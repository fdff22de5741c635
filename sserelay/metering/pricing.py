"""What tokens cost: the one place a cost is computed (pure).

`Pricing` holds the run's flat `--price` (currency per 1M tokens) and the per-model prices of a
TOML price list (`--prices FILE`).

The file maps a model name to its input and output price, in currency per 1M tokens:

    ["gpt-4o-mini"]
    input = 0.15
    cached_input = 0.075   # optional: input read from the provider's prompt cache
    output = 0.60

    [claude-sonnet-4-5]
    input = 3
    output = 15

A model reported as `gpt-4o-mini-2024-07-18` matches `gpt-4o-mini` (the longest listed name
it starts with), since providers answer with dated snapshots of the model that was asked for.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass

from sserelay.errors import ConfigError
from sserelay.metering.usage import Usage


class PriceListError(ConfigError):
    """The price list is not valid TOML of the documented shape."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Currency per 1M tokens, for the prompt (input), the answer (output), and input read
    from the provider's prompt cache (`cached_input`; None: billed as input)."""

    input: float
    output: float
    cached_input: float | None = None


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
            values: dict[str, float] = {}
            for side in ("input", "output", "cached_input"):
                if side not in entry and side == "cached_input":
                    continue
                value = entry.get(side, 0.0)
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise PriceListError(f"[{model}] {side} must be a number >= 0")
                if not math.isfinite(value):
                    raise PriceListError(f"[{model}] {side} must be a finite number")
                values[side] = float(value)
            unknown = set(entry) - {"input", "output", "cached_input"}
            if unknown:
                raise PriceListError(f"[{model}] has unknown keys: {', '.join(sorted(unknown))}")
            prices[model] = ModelPrice(
                values["input"], values["output"], values.get("cached_input")
            )
        return cls(prices)

    def for_model(self, model: str | None) -> ModelPrice | None:
        """The price of `model`: an exact entry, else the longest entry it starts with."""
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        prefixes = [name for name in self.prices if model.startswith(name)]
        return self.prices[max(prefixes, key=len)] if prefixes else None


def cost_of(tokens: int, price_per_million: float | None) -> float | None:
    """Cost of `tokens` at `price_per_million` (currency per 1M tokens), or None."""
    if price_per_million is None:
        return None
    return round(tokens * price_per_million / 1_000_000, 10)


@dataclass(frozen=True, slots=True)
class Pricing:
    """The run's prices: a flat `per_million` for every token, and `models` (a price list)
    for requests whose model it lists."""

    per_million: float | None = None
    models: PriceList | None = None

    def model_price(self, model: str | None) -> ModelPrice | None:
        return None if self.models is None else self.models.for_model(model)

    def cost(
        self, tokens: int, usage: Usage | None = None, model: str | None = None
    ) -> float | None:
        """One request's cost. With its model's price and a usage the upstream reported: its
        input at the input price (cached input at `cached_input`, where both are known) plus
        its output at the output price. With the model's price and no report: the metered
        tokens at the output price (the input is unknown). Without the model's price: the
        metered tokens at the flat price, or None (unpriced, never 0)."""
        price = self.model_price(model)
        if price is None:
            return cost_of(tokens, self.per_million)
        if usage is None or not usage.reported:
            return round(tokens * price.output / 1_000_000, 10)
        uncached, cached = usage.input_split()
        cached_price = price.input if price.cached_input is None else price.cached_input
        output = tokens if usage.output_tokens is None else usage.output_tokens
        total = uncached * price.input + cached * cached_price + output * price.output
        return round(total / 1_000_000, 10)

    def input_cost(self, usage: Usage | None, model: str | None) -> float:
        """What a request's reported input cost (0 where unknown or unpriced): a cost
        budget charges it when the upstream reports it."""
        price = self.model_price(model)
        if price is None or usage is None or usage.input_tokens is None:
            return 0.0
        uncached, cached = usage.input_split()
        cached_price = price.input if price.cached_input is None else price.cached_input
        return (uncached * price.input + cached * cached_price) / 1_000_000

    def output_price(self, model: str | None) -> float:
        """The cost of one output token of `model` (0 where unpriced)."""
        price = self.model_price(model)
        if price is not None:
            return price.output / 1_000_000
        return (self.per_million or 0.0) / 1_000_000

    def total(
        self, tokens: int, requests: Iterable[tuple[float | None, str | None]]
    ) -> float | None:
        """A run's cost, from its `tokens` and each request's (cost, model): the sum of the
        requests' costs once any of them was priced by its model, else `tokens` at the flat
        price."""
        requests = list(requests)
        if not any(self.model_price(model) is not None for _, model in requests):
            return cost_of(tokens, self.per_million)
        return round(sum(cost for cost, _ in requests if cost is not None), 10)
