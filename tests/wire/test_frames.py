"""Tests for the per-event values whose `__init__` is written by hand (for speed): `Frames`
and `Delta` must behave as the frozen dataclasses they are declared as."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from sserelay.providers.payloads import Delta
from sserelay.wire.frames import Frames


@pytest.mark.parametrize(
    ("cls", "given"),
    [(Frames, (b"x", 1, 2, 3)), (Delta, ("t", None, "m", True))],
)
def test_hand_written_init_matches_the_fields(cls: type, given: tuple[object, ...]) -> None:
    fields = dataclasses.fields(cls)
    parameters = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in parameters] == [f.name for f in fields]
    assert [p.default for p in parameters] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fields
    ]
    value = cls(*given)
    assert dataclasses.astuple(value) == given
    assert value == cls(**{f.name: v for f, v in zip(fields, given, strict=True)})
    assert hash(value) == hash(cls(*given))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, fields[0].name, given[0])


def test_defaults() -> None:
    assert Frames(b"", 0, 0) == Frames(b"", 0, 0, 0)
    assert Delta() == Delta("", None, None, False)
