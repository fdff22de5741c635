"""Budgets: UTC periods, the 60-second rate window, admission, and allowances that never let
the streams of a key take more than its budget, also interleaved and across instances."""

from __future__ import annotations

import ast
import asyncio
import math
import random
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.metering import accounts as accounts_module
from sserelay.metering import budget as budget_module
from sserelay.metering import keys as keys_module
from sserelay.metering.budget import (
    Account,
    Admission,
    Allowance,
    Budgets,
    MemoryBudgetStore,
    RateWindow,
    Refusal,
    Remaining,
    Spend,
    cost_units,
    next_reset,
    period_start,
)
from sserelay.metering.keys import Key, KeyRing, Period, secret_digest
from tests.conftest import run_bounded

T = TypeVar("T")
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def ts(text: str) -> float:
    """Epoch seconds of an ISO 8601 UTC time, e.g. "2024-02-29T23:59:59Z"."""
    return datetime.fromisoformat(text).timestamp()


def key(name: str = "alice", **limits: Any) -> Key:
    return Key(name, secret_digest(f"secret-{name}"), **limits)


def run_now(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that must finish without waiting (the in-memory store never waits)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise AssertionError("the coroutine waited")


def take(allowance: Allowance, tokens: int, cost: float = 0.0) -> bool:
    """The relay's per-event step: the local reserve, then the store only on a miss."""
    if allowance.try_take(tokens, cost):
        return True
    if not run_now(allowance.refill(tokens, cost)):
        return False
    assert allowance.try_take(tokens, cost), "refill said yes, so try_take must succeed"
    return True


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- the layer rule


@pytest.mark.parametrize("module", [budget_module, accounts_module, keys_module])
def test_the_budget_modules_are_pure(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert (
        imported & {"asyncio", "httpx", "starlette", "uvicorn", "click", "rich", "socket"} == set()
    )


# --------------------------------------------------------------------------- periods

PERIODS = [
    # (period, now, start, reset)
    ("total", "2026-11-27T13:45:00Z", "1970-01-01T00:00:00Z", None),
    ("hour", "2026-11-27T13:45:10.5Z", "2026-11-27T13:00:00Z", "2026-11-27T14:00:00Z"),
    ("hour", "2026-11-27T13:00:00Z", "2026-11-27T13:00:00Z", "2026-11-27T14:00:00Z"),
    ("hour", "2026-11-27T12:59:59.999Z", "2026-11-27T12:00:00Z", "2026-11-27T13:00:00Z"),
    ("day", "2026-11-27T13:45:00Z", "2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z"),
    ("day", "2026-11-27T23:59:59.999999Z", "2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z"),
    ("day", "2026-11-28T00:00:00Z", "2026-11-28T00:00:00Z", "2026-11-29T00:00:00Z"),
    ("month", "2026-11-27T13:45:00Z", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
    ("month", "2026-01-31T23:59:59Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("month", "2026-04-30T12:00:00Z", "2026-04-01T00:00:00Z", "2026-05-01T00:00:00Z"),
    # leap day, and the February of a year without one
    ("day", "2024-02-29T12:00:00Z", "2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z"),
    ("month", "2024-02-29T23:59:59Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"),
    ("month", "2023-02-28T23:59:59Z", "2023-02-01T00:00:00Z", "2023-03-01T00:00:00Z"),
    # year end: every period rolls over at once
    ("hour", "2025-12-31T23:59:59.5Z", "2025-12-31T23:00:00Z", "2026-01-01T00:00:00Z"),
    ("day", "2025-12-31T23:59:59.5Z", "2025-12-31T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("month", "2025-12-31T23:59:59.5Z", "2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z"),
    ("month", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
]


@pytest.mark.parametrize(("period", "now", "start", "reset"), PERIODS)
def test_period_start_and_next_reset(period: str, now: str, start: str, reset: str | None) -> None:
    assert period_start(Period(period), ts(now)) == ts(start)
    assert next_reset(Period(period), ts(now)) == (None if reset is None else ts(reset))


@given(
    st.sampled_from([Period.HOUR, Period.DAY, Period.MONTH]),
    st.floats(0, 4_102_444_800),  # 1970 .. 2100
)
def test_every_moment_lies_in_exactly_one_period(period: Period, now: float) -> None:
    start = period_start(period, now)
    reset = next_reset(period, now)
    assert reset is not None
    assert start <= now < reset
    assert period_start(period, start) == start
    assert period_start(period, reset) == reset  # the next period starts where this one ends
    assert next_reset(period, start) == reset
    assert start == int(start)


# --------------------------------------------------------------------------- rate window


def test_the_rate_window_counts_the_last_60_seconds() -> None:
    window = RateWindow()
    assert window.used(NOW) == 0
    window.add(10, NOW + 0.2)
    window.add(5, NOW + 0.9)
    window.add(7, NOW + 30.5)
    assert window.used(NOW + 30.5) == 22
    assert window.used(NOW + 59.99) == 22
    assert window.used(NOW + 60.0) == 7  # second NOW's tokens left as second NOW+60 began
    assert window.used(NOW + 89.99) == 7
    assert window.used(NOW + 90.0) == 0
    window.add(3, NOW + 200)  # a bucket reused a lap later starts from zero
    assert window.used(NOW + 200) == 3


def test_retry_after_is_when_the_window_drops_below_the_limit() -> None:
    window = RateWindow()
    window.add(60, NOW + 1)
    window.add(30, NOW + 11)
    window.add(30, NOW + 21)
    now = NOW + 30.25
    assert window.used(now) == 120
    assert window.retry_after(now, 121) == 0.0
    assert window.retry_after(now, 120) == pytest.approx(30.75)  # 60 leave at NOW+61
    assert window.retry_after(now, 61) == pytest.approx(30.75)
    assert window.retry_after(now, 60) == pytest.approx(40.75)  # 30 more leave at NOW+71
    assert window.retry_after(now, 31) == pytest.approx(40.75)
    assert window.retry_after(now, 30) == pytest.approx(50.75)
    assert window.retry_after(now, 1) == pytest.approx(50.75)
    with pytest.raises(ValueError):
        window.retry_after(now, 0)


def test_a_clock_that_steps_back_stands_still() -> None:
    window = RateWindow()
    window.add(10, NOW + 100)
    window.add(5, NOW + 41)  # 59 s back: counted as now, not written over a live bucket
    assert window.used(NOW + 100) == 15
    assert window.used(NOW) == 15
    assert window.used(NOW + 160) == 0


@given(
    st.lists(st.tuples(st.floats(0, 5), st.integers(0, 1000)), max_size=120),
    st.integers(1, 5000),
)
def test_the_rate_window_agrees_with_a_plain_list(
    steps: list[tuple[float, int]], limit: int
) -> None:
    window = RateWindow()
    added: list[tuple[int, int]] = []
    now = NOW
    for gap, tokens in steps:
        now += gap
        window.add(tokens, now)
        added.append((math.floor(now), tokens))
        assert window.used(now) == sum(n for at, n in added if at > math.floor(now) - 60)
    wait = window.retry_after(now, limit)
    if wait > 0:  # asked first: a window treats an earlier time than it has seen as that one
        assert window.used(now + wait - 0.001) >= limit
    assert window.used(now + wait) < limit


# --------------------------------------------------------------------------- cost units


def test_costs_are_summed_exactly() -> None:
    assert sum(cost_units(0.1) for _ in range(25)) == cost_units(2.5)
    assert sum(0.1 for _ in range(25)) != 2.5  # what floats would have done
    assert cost_units(0.15 / 1e6) == 150_000 and Spend.of(3, 2.5).cost == 2.5
    for bad in [-0.01, math.nan, math.inf]:
        with pytest.raises(ValueError):
            cost_units(bad)


# --------------------------------------------------------------------------- admission


def budgets_of(*keys: Key, clock: Clock | None = None, **options: Any) -> Budgets:
    return Budgets(KeyRing(keys), clock=clock or Clock(NOW), **options)


def test_admission_refusals_have_their_reason_status_and_message() -> None:
    alice = key("alice", models=("gpt-4o-mini", "claude-*"))
    budgets = budgets_of(alice)

    nobody = budgets.admit(None, "gpt-4o-mini", NOW)
    assert (nobody.ok, nobody.reason, nobody.status, nobody.retry_after) == (
        False,
        Refusal.UNAUTHORIZED,
        401,
        None,
    )
    assert nobody.message == "missing or unknown key"

    forbidden = budgets.admit(alice, "gpt-5", NOW)
    assert (forbidden.reason, forbidden.status, forbidden.retry_after) == (
        "forbidden",
        403,
        None,
    )
    assert forbidden.message == (
        "key 'alice' may not use model 'gpt-5'; it may use: gpt-4o-mini, claude-*"
    )
    no_model = budgets.admit(alice, None, NOW)
    assert no_model.reason == "forbidden" and "names none" in no_model.message
    hostile = budgets.admit(alice, "x\n" * 100, NOW)
    assert "\n" not in hostile.message and len(hostile.message) < 200

    ok = budgets.admit(alice, "Claude-Haiku", NOW)
    assert ok == Admission(alice) and ok.ok and ok.status == 200 and ok.reason is None
    assert {refusal.value for refusal in Refusal} == {
        "unauthorized",
        "forbidden",
        "budget_exhausted",
        "rate_limited",
    }


def test_a_spent_day_budget_refuses_until_the_reset() -> None:
    alice = key("alice", budget_tokens=30, period=Period.DAY)
    now = ts("2026-11-27T13:45:00.5Z")
    budgets = budgets_of(alice, spent={"alice": Spend(30)}, now=now)
    refused = budgets.admit(alice, None, now)
    assert (refused.reason, refused.status) == ("budget_exhausted", 429)
    assert refused.message == (
        "key 'alice' has spent its day budget of 30 tokens; it resets at 2026-11-28T00:00:00Z"
    )
    assert refused.retry_after == math.ceil(ts("2026-11-28T00:00:00Z") - now) == 36900
    assert budgets.admit(alice, None, ts("2026-11-28T00:00:00Z")).ok


def test_a_spent_total_budget_says_it_never_resets() -> None:
    alice = key("alice", budget_tokens=30)
    refused = budgets_of(alice, spent={"alice": Spend(31)}).admit(alice, None, NOW + 1e9)
    assert refused.reason == "budget_exhausted" and refused.retry_after is None
    assert refused.message == "key 'alice' has spent its budget of 30 tokens; it does not reset"


def test_a_spent_cost_budget_refuses_and_a_zero_budget_suspends_a_key() -> None:
    alice = key("alice", budget_tokens=1000, budget_cost=2.5, period=Period.MONTH)
    budgets = budgets_of(alice, spent={"alice": Spend.of(10, 2.5)})
    refused = budgets.admit(alice, None, NOW)
    assert refused.reason == "budget_exhausted"
    assert refused.message.startswith("key 'alice' has spent its month cost budget of 2.5;")
    suspended = key("bob", budget_tokens=0)
    assert budgets_of(suspended).admit(suspended, None, NOW).reason == "budget_exhausted"


def test_the_rate_limit_refuses_new_requests_but_never_cuts_a_stream() -> None:
    clock = Clock(NOW)
    alice = key("alice", tokens_per_minute=100)
    budgets = budgets_of(alice, clock=clock)
    stream = budgets.allowance(alice, clock.now)
    for _ in range(15):  # 150 tokens: the running stream goes on past the limit
        assert take(stream, 10)
    clock.now += 20.5
    refused = budgets.admit(alice, None, clock.now)
    assert (refused.reason, refused.status, refused.retry_after) == ("rate_limited", 429, 40)
    assert refused.message == (
        "key 'alice' has reached its rate limit of 100 tokens per minute; retry in 40 s"
    )
    assert budgets.admit(alice, None, NOW + 59.9).reason == "rate_limited"
    assert budgets.admit(alice, None, NOW + 60).ok


def test_a_spent_budget_is_told_before_a_rate_limit() -> None:
    alice = key("alice", budget_tokens=10, tokens_per_minute=10)
    budgets = budgets_of(alice)
    with budgets.allowance(alice, NOW) as stream:
        assert take(stream, 10)
    assert budgets.admit(alice, None, NOW).reason == "budget_exhausted"


# --------------------------------------------------------------------------- allowances


def test_a_stream_is_cut_at_the_event_that_would_cross_the_budget() -> None:
    alice = key("alice", budget_tokens=30)
    budgets = budgets_of(alice)
    stream = budgets.allowance(alice, NOW)
    assert not stream.try_take(7)  # nothing reserved yet: the first event asks the store
    assert run_now(stream.refill(7)) and stream.try_take(7)
    delivered = 7
    for size in [5, 9, 8, 4, 3]:
        if not take(stream, size):
            break
        delivered += size
    assert delivered == 29 and stream.tokens == 29  # 7+5+9+8 = 29; 4 more would be 33
    assert not take(stream, 2) and take(stream, 1) and not take(stream, 1)
    assert budgets.remaining(alice, NOW) == Remaining(0, None)
    assert budgets.admit(alice, None, NOW).reason == "budget_exhausted"
    stream.close()
    assert budgets.spent(alice, NOW) == Spend(30)


def test_close_returns_what_a_stream_did_not_use() -> None:
    alice = key("alice", budget_tokens=100, budget_cost=1.0)
    store = MemoryBudgetStore()
    budgets = budgets_of(alice, store=store)
    account = Account(alice, 0.0)
    with budgets.allowance(alice, NOW) as stream:
        assert take(stream, 10, 0.25)
        assert store.available(account) == Spend(0, 0)  # the pool holds all that is left
        assert budgets.remaining(alice, NOW) == Remaining(90, 0.75)
        assert budgets.spent(alice, NOW) == Spend.of(10, 0.25)
    assert stream.closed
    assert store.available(account) == Spend(90, cost_units(0.75))
    assert store.committed(account) == Spend.of(10, 0.25)
    assert budgets.remaining(alice, NOW) == Remaining(90, 0.75)
    stream.close()  # twice is fine
    with pytest.raises(ValueError, match="closed"):
        stream.try_take(1)
    with pytest.raises(ValueError, match="closed"):
        run_now(stream.refill(1))
    with pytest.raises(ValueError, match="closed"):
        stream.charge_input(0.1)


def test_concurrent_streams_of_a_key_share_one_budget() -> None:
    alice = key("alice", budget_tokens=50)
    budgets = budgets_of(alice)
    first, second = budgets.allowance(alice, NOW), budgets.allowance(alice, NOW)
    assert take(first, 20) and take(second, 20)
    assert not take(first, 11)  # 40 + 11 would pass 50, even though each stream has only 20
    assert take(second, 10) and not take(first, 1)
    first.close()
    assert budgets.remaining(alice, NOW) == Remaining(0, None)
    second.close()
    assert budgets.spent(alice, NOW) == Spend(50)


def test_a_key_without_a_budget_never_asks_the_store() -> None:
    class NoStore(MemoryBudgetStore):
        async def reserve(self, account: Account, need: Spend) -> Spend:
            raise AssertionError("reserve called for an unlimited key")

    free = key("free")
    budgets = budgets_of(free, store=NoStore())
    with budgets.allowance(free, NOW) as stream:
        for _ in range(1000):
            assert stream.try_take(1_000_000, 5.0)
    assert budgets.remaining(free, NOW) == Remaining(None, None)
    assert budgets.spent(free, NOW) == Spend.of(1_000_000_000, 5000.0)
    tokens_only = key("tokens", budget_tokens=10)  # a cost without a cost budget is free
    budgets = budgets_of(tokens_only)
    with budgets.allowance(tokens_only, NOW) as stream:
        assert take(stream, 10, 1e6) and not take(stream, 1, 0.0)
    assert budgets.remaining(tokens_only, NOW) == Remaining(0, None)


def test_a_cost_budget_is_reached_exactly_by_float_costs() -> None:
    alice = key("alice", budget_cost=2.5)
    budgets = budgets_of(alice)
    with budgets.allowance(alice, NOW) as stream:
        assert all(take(stream, 1, 0.1) for _ in range(25))
        assert not take(stream, 1, 1e-12)
        assert take(stream, 1, 0.0)  # an event that costs nothing still goes out
    assert budgets.spent(alice, NOW).units == cost_units(2.5)


def test_input_cost_may_overdraw_and_then_blocks_the_next_costed_event_and_request() -> None:
    alice = key("alice", budget_cost=1.0, period=Period.DAY)
    budgets = budgets_of(alice)
    with budgets.allowance(alice, NOW) as stream:
        assert take(stream, 10, 0.5)
        stream.charge_input(0.75)  # reported by the upstream: charged even past the budget
        assert stream.cost == 1.25
        assert budgets.remaining(alice, NOW) == Remaining(None, 0.0)
        assert not take(stream, 1, 0.01)
    assert budgets.spent(alice, NOW) == Spend.of(10, 1.25)
    refused = budgets.admit(alice, None, NOW)
    assert refused.reason == "budget_exhausted" and refused.retry_after is not None
    assert budgets.admit(alice, None, next_reset(Period.DAY, NOW) or 0).ok


def test_bad_amounts_are_refused_loudly() -> None:
    alice = key("alice", budget_tokens=10)
    stream = budgets_of(alice).allowance(alice, NOW)
    with pytest.raises(ValueError):
        stream.try_take(-1)
    with pytest.raises(ValueError):
        stream.try_take(1, -0.5)
    with pytest.raises(ValueError):
        stream.try_take(1, math.nan)
    with pytest.raises(ValueError):
        stream.charge_input(math.inf)
    assert stream.tokens == 0 and stream.units == 0


def test_a_stream_counts_toward_the_period_it_was_admitted_in() -> None:
    clock = Clock(ts("2026-11-27T23:59:59Z"))
    alice = key("alice", budget_tokens=30, period=Period.DAY)
    budgets = budgets_of(alice, clock=clock)
    yesterday = clock.now
    stream = budgets.allowance(alice, clock.now)
    assert take(stream, 20)
    clock.now = ts("2026-11-28T00:00:05Z")  # midnight passes mid-stream
    assert take(stream, 10) and not take(stream, 1)  # still yesterday's budget: cut at 30
    assert budgets.remaining(alice, clock.now) == Remaining(30, None)
    assert budgets.admit(alice, None, clock.now).ok
    with budgets.allowance(alice, clock.now) as today:
        assert take(today, 30) and not take(today, 1)
    stream.close()
    assert budgets.spent(alice, yesterday) == Spend(30)
    assert budgets.spent(alice, clock.now) == Spend(30)
    assert stream.account.start == ts("2026-11-27T00:00:00Z")


def test_spent_so_far_is_seeded_for_the_current_period_only() -> None:
    now = ts("2026-11-27T10:00:00Z")
    alice = key("alice", budget_tokens=100, budget_cost=5.0, period=Period.DAY)
    bob = key("bob", budget_tokens=100)
    budgets = budgets_of(alice, bob, spent={"alice": Spend.of(25, 1.5), "gone": Spend(99)}, now=now)
    assert budgets.remaining(alice, now) == Remaining(75, 3.5)
    assert budgets.remaining(bob, now) == Remaining(100, None)
    assert budgets.remaining(alice, ts("2026-11-28T00:00:00Z")) == Remaining(100, 5.0)
    with budgets.allowance(alice, now) as stream:
        assert take(stream, 75) and not take(stream, 1)
    # a restart seeded with the ledger's sum finds the same state
    again = budgets_of(alice, bob, spent={"alice": budgets.spent(alice, now)}, now=now)
    assert again.remaining(alice, now) == Remaining(0, 3.5)
    assert again.admit(alice, None, now).reason == "budget_exhausted"


def test_status_rows_for_keys_status() -> None:
    clock = Clock(ts("2026-11-27T10:00:00Z"))
    alice = key("alice", budget_tokens=100, budget_cost=5.0, period=Period.DAY)
    bob = key("bob", tokens_per_minute=1000)
    budgets = budgets_of(alice, bob, clock=clock, spent={"alice": Spend.of(25, 1.5)})
    with budgets.allowance(bob, clock.now) as stream:
        assert take(stream, 42)
    alice_row, bob_row = budgets.status(clock.now)
    assert (alice_row.name, alice_row.period, alice_row.budget_tokens) == ("alice", "day", 100)
    assert (alice_row.spent_tokens, alice_row.spent_cost) == (25, 1.5)
    assert (alice_row.remaining_tokens, alice_row.remaining_cost) == (75, 3.5)
    assert alice_row.resets_at == ts("2026-11-28T00:00:00Z")
    assert (alice_row.tokens_per_minute, alice_row.tokens_last_minute) == (None, None)
    assert (bob_row.spent_tokens, bob_row.remaining_tokens, bob_row.resets_at) == (42, None, None)
    assert (bob_row.tokens_per_minute, bob_row.tokens_last_minute) == (1000, 42)


def test_the_memory_store_forgets_past_periods() -> None:
    alice = key("alice", budget_tokens=10, period=Period.HOUR)
    store = MemoryBudgetStore()
    budgets = budgets_of(alice, store=store)
    for hour in range(48):
        with budgets.allowance(alice, NOW + hour * 3600) as stream:
            assert take(stream, 10)
    assert len(store._entries["alice"]) == 1
    assert budgets._pools == {}


# --------------------------------------------------------------------------- exactness


@settings(max_examples=300, deadline=None)
@given(
    budget=st.integers(0, 300),
    cost_budget=st.none() | st.sampled_from([0.0, 0.3, 2.5]),
    block=st.none() | st.integers(1, 60),
    instances=st.integers(1, 3),
    ops=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(0, 40),
            st.sampled_from([0.0, 0.01, 0.1, 0.25]),
            st.integers(0, 9),
        ),
        max_size=80,
    ),
)
def test_interleaved_streams_never_take_more_than_the_budget(
    budget: int,
    cost_budget: float | None,
    block: int | None,
    instances: int,
    ops: list[tuple[int, int, float, int]],
) -> None:
    alice = key("alice", budget_tokens=budget, budget_cost=cost_budget)
    cap_units = None if cost_budget is None else cost_units(cost_budget)
    # a block store behaves as a shared store would; several Budgets on it are instances
    store = MemoryBudgetStore(None if block is None else Spend(block, cost_units(block * 0.01)))
    processes = [budgets_of(alice, store=store) for _ in range(instances)]
    streams = [processes[i % instances].allowance(alice, NOW) for i in range(6)]
    taken_tokens = taken_units = 0
    for index, tokens, cost, dice in ops:
        stream = streams[index]
        if dice == 0:  # now and then a stream ends
            stream.close()
            continue
        if stream.closed:
            continue
        here = processes[index % instances]
        before = here._remaining_units(alice, NOW)
        if take(stream, tokens, cost):
            taken_tokens += tokens
            taken_units += cost_units(cost)
        elif instances == 1:
            # one process never refuses while the key has enough left
            assert tokens > (before[0] or 0) or (
                cap_units is not None and cost_units(cost) > (before[1] or 0)
            )
        assert taken_tokens <= budget
        assert cap_units is None or taken_units <= cap_units
        assert sum(s.tokens for s in streams) == taken_tokens
        assert sum(s.units for s in streams) == taken_units
        if instances == 1:
            assert here.remaining(alice, NOW).tokens == budget - taken_tokens
    for stream in streams:
        stream.close()
    account = Account(alice, 0.0)
    assert store.committed(account) == Spend(taken_tokens, taken_units)
    assert store.available(account) == Spend(
        budget - taken_tokens, 0 if cap_units is None else cap_units - taken_units
    )
    for process in processes:
        assert process.spent(alice, NOW) == Spend(taken_tokens, taken_units)
        assert process._pools == {}


class WaitingStore(MemoryBudgetStore):
    """A store whose reserve waits, as a round trip to Redis would."""

    async def reserve(self, account: Account, need: Spend) -> Spend:
        await asyncio.sleep(0)
        grant = self.reserve_now(account, need)
        await asyncio.sleep(0)
        return grant


@pytest.mark.parametrize(("instances", "block"), [(1, None), (1, 7), (3, 7), (3, None)])
def test_concurrent_tasks_with_a_waiting_store_stay_within_the_budget(
    instances: int, block: int | None
) -> None:
    alice = key("alice", budget_tokens=500)
    store = WaitingStore(None if block is None else Spend(block))
    processes = [budgets_of(alice, store=store) for _ in range(instances)]
    rng = random.Random(14)
    plans = [[rng.randint(0, 9) for _ in range(60)] for _ in range(12)]

    async def relay(budgets: Budgets, sizes: list[int]) -> int:
        with budgets.allowance(alice, NOW) as stream:
            for size in sizes:
                if not stream.try_take(size):
                    if not await stream.refill(size):
                        break  # budget exhausted: this event is not sent
                    assert stream.try_take(size)
                await asyncio.sleep(0)  # the event is written; other streams run
            return stream.tokens

    async def main() -> list[int]:
        return await asyncio.gather(
            *(relay(processes[i % instances], plan) for i, plan in enumerate(plans))
        )

    delivered = run_bounded(main())
    assert sum(delivered) <= 500
    if instances == 1:
        assert sum(delivered) > 500 - 9  # nobody was cut while enough was left
    assert store.committed(Account(alice, 0.0)) == Spend(sum(delivered))
    assert store.available(Account(alice, 0.0)) == Spend(500 - sum(delivered))


def test_a_window_counts_what_other_instances_added_as_last_heard() -> None:
    window = RateWindow()
    window.add(30, NOW)
    window.set_elsewhere({math.floor(NOW): 50, math.floor(NOW) - 30: 15, math.floor(NOW) - 90: 99})
    assert window.local(NOW) == [(math.floor(NOW), 30)]
    assert window.used(NOW) == 95  # 30 here, 65 elsewhere within the minute
    assert window.retry_after(NOW, 90) == 30.0  # once the 15 from 30 s ago leave the window
    window.set_elsewhere({})
    assert window.used(NOW) == 30
