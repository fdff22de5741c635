"""The Pacer (`--rate`, `--delay`, `--realtime`): pure arithmetic on the times it is given."""

from __future__ import annotations

import pytest

from sserelay.sources.pacing import Pacer


def schedule(
    pacer: Pacer, events: list[tuple[int, float | None]], now: float = 100.0
) -> list[float]:
    """Due times of `events` (tokens, recorded offset) when each is asked for the moment
    the previous one went out."""
    out = []
    for tokens, at in events:
        now = pacer.next_time(tokens, at, now)
        out.append(now)
    return out


def test_no_pacing_is_inactive() -> None:
    assert not Pacer().active
    assert Pacer(rate=10).active and Pacer(delay=0.1).active and Pacer(realtime=True).active


def test_rate_gives_each_event_the_time_of_its_tokens_and_the_first_goes_at_once() -> None:
    due = schedule(Pacer(rate=10), [(3, None), (2, None), (5, None), (0, None)])
    assert due == pytest.approx([100.0, 100.2, 100.7, 100.7])


def test_delay_spaces_events_and_adds_to_the_rate() -> None:
    assert schedule(Pacer(delay=0.5), [(1, None)] * 3) == pytest.approx([100, 100.5, 101])
    assert schedule(Pacer(rate=4, delay=0.5), [(1, None)] * 3) == pytest.approx(
        [100, 100.75, 101.5]
    )


def test_a_little_lateness_is_caught_up_without_drift() -> None:
    pacer = Pacer(rate=100)
    assert pacer.next_time(1, None, 0.0) == 0.0
    # Asked 5 ms late: still due on the schedule (0.01), so the rate does not drift.
    assert pacer.next_time(1, None, 0.015) == pytest.approx(0.01)
    assert pacer.next_time(1, None, 0.016) == pytest.approx(0.02)


def test_a_long_stall_restarts_from_now_instead_of_bursting() -> None:
    pacer = Pacer(rate=10, catch_up=0.25)
    pacer.next_time(1, None, 0.0)
    assert pacer.next_time(1, None, 5.0) == 5.0  # nobody listened for 5 s
    assert pacer.next_time(1, None, 5.0) == pytest.approx(5.1)


def test_realtime_keeps_recorded_offsets_including_the_first() -> None:
    due = schedule(Pacer(realtime=True), [(9, 0.25), (1, 0.5), (1, 0.5), (1, 1.5)])
    assert due == pytest.approx([100.25, 100.5, 100.5, 101.5])


def test_realtime_treats_untimed_events_as_unpaced() -> None:
    assert schedule(Pacer(realtime=True), [(1, None), (1, None)]) == [100.0, 100.0]


def test_realtime_never_goes_back_in_time() -> None:
    assert schedule(Pacer(realtime=True), [(1, 1.0), (1, 0.5)]) == pytest.approx([101, 101])


@pytest.mark.parametrize(("rate", "delay"), [(0.0, 0.0), (-1.0, 0.0), (None, -0.1)])
def test_invalid_pacing_is_a_value_error(rate: float | None, delay: float) -> None:
    with pytest.raises(ValueError):
        Pacer(rate=rate, delay=delay)
