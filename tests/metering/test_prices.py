"""Tests for `sserelay.metering.pricing`: the `--prices` TOML price list."""

from __future__ import annotations

import pytest

from sserelay.metering.pricing import ModelPrice, PriceList, PriceListError

LIST = """
["gpt-4o"]
input = 2.5
output = 10

["gpt-4o-mini"]
input = 0.15
output = 0.6

[free-model]
"""


def test_exact_then_longest_prefix() -> None:
    prices = PriceList.from_toml(LIST)
    assert prices.for_model("gpt-4o") == ModelPrice(2.5, 10.0)
    assert prices.for_model("gpt-4o-mini-2024-07-18") == ModelPrice(0.15, 0.6)
    assert prices.for_model("gpt-4o-2024-08-06") == ModelPrice(2.5, 10.0)
    assert prices.for_model("free-model") == ModelPrice(0.0, 0.0)
    assert prices.for_model("claude") is None
    assert prices.for_model(None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[m\ninput = 1", "not valid TOML"),
        ("m = 3", "must be a table"),
        ('[m]\ninput = "1"', "input must be a number"),
        ("[m]\noutput = -1", "output must be a number >= 0"),
        ("[m]\ninput = true", "input must be a number"),
        ("[m]\ninptu = 1", "unknown keys: inptu"),
    ],
)
def test_bad_price_lists_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PriceListError, match=message):
        PriceList.from_toml(text)
