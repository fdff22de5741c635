"""What a key has spent, and where that is kept: exact cost units, UTC calendar periods, the
rate window of the last minute, and the `BudgetStore` that one or several instances share
(`MemoryBudgetStore` for one process; sserelay.cluster's Redis store for several). Pure.

See budget.py for the policy these serve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sserelay.metering.keys import Key, Period

#: Integer cost units per unit of currency: budgets count cost in picounits, exactly.
COST_UNITS = 10**12
_UNITS_PER_CURRENCY = float(COST_UNITS)
_HOUR = 3600
_DAY = 86400
_WINDOW = 60  # seconds (and one-second buckets) in a rate window


def cost_units(cost: float) -> int:
    """`cost` (currency) in integer cost units, rounded to the nearest; ValueError unless >= 0."""
    if 0.0 <= cost < math.inf:  # false for nan too
        return int(cost * _UNITS_PER_CURRENCY + 0.5)  # round(), a little cheaper: per event
    raise ValueError("a cost must be a finite number >= 0")


# --------------------------------------------------------------------------- periods


def period_start(period: Period, now: float) -> float:
    """The start of the period holding `now` (epoch seconds): the UTC hour, day or month.

    A moment exactly on a boundary belongs to the period it starts. "total" starts at 0.
    """
    if period == Period.TOTAL:
        return 0.0
    if period == Period.HOUR:
        return now - now % _HOUR  # exact: fmod is exact, and so is this difference
    day = now - now % _DAY
    if period == Period.DAY:
        return day
    first = datetime.fromtimestamp(day, UTC).replace(day=1)
    return first.timestamp()


def next_reset(period: Period, now: float) -> float | None:
    """When the period holding `now` ends and the budget starts again; None for "total"."""
    start = period_start(period, now)
    if period == Period.TOTAL:
        return None
    if period == Period.HOUR:
        return start + _HOUR
    if period == Period.DAY:
        return start + _DAY
    first = datetime.fromtimestamp(start, UTC)
    following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    return following.timestamp()


def iso_moment(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- rate window


class RateWindow:
    """Tokens added over the last 60 seconds, in 60 one-second buckets.

    `add` is O(1). A token added during second S counts until second S + 60 begins, so the
    window is never longer than 60 s (up to one second shorter). A clock that steps back is
    treated as one that stood still, so no bucket is overwritten early.
    """

    __slots__ = ("_counts", "_elsewhere", "_latest", "_seconds")

    def __init__(self) -> None:
        self._counts = [0] * _WINDOW
        self._seconds = [-_WINDOW - 1] * _WINDOW  # the second each bucket counts; none yet
        self._latest = -_WINDOW - 1
        self._elsewhere: dict[int, int] = {}

    def _second(self, now: float) -> int:
        second = math.floor(now)
        if second < self._latest:
            return self._latest
        self._latest = second
        return second

    def add(self, tokens: int, now: float) -> None:
        """Count `tokens` at time `now`."""
        second = math.floor(now)  # _second(), inlined: this runs once per event
        if second < self._latest:
            second = self._latest
        else:
            self._latest = second
        slot = second % _WINDOW
        if self._seconds[slot] == second:
            self._counts[slot] += tokens
        else:
            self._seconds[slot] = second
            self._counts[slot] = tokens

    def local(self, now: float) -> list[tuple[int, int]]:
        """(second, tokens) added here that are still in the window at `now`, oldest first."""
        second = self._second(now)
        return sorted(
            (at, count)
            for at, count in zip(self._seconds, self._counts, strict=True)
            if second - _WINDOW < at <= second and count
        )

    def set_elsewhere(self, counts: Mapping[int, int]) -> None:
        """What other instances added, per second (epoch), as a shared store last heard:
        counted in `used` and `retry_after` along with what was added here."""
        self._elsewhere = dict(counts)

    def _live(self, now: float) -> list[tuple[int, int]]:
        """(second, tokens) of the buckets still in the window at `now`, oldest first."""
        live = self.local(now)
        if not self._elsewhere:
            return live
        second = self._second(now)
        merged = dict(live)
        for at, count in self._elsewhere.items():
            if second - _WINDOW < at <= second and count > 0:
                merged[at] = merged.get(at, 0) + count
        return sorted(merged.items())

    def used(self, now: float) -> int:
        """The tokens added in the 60 seconds up to `now`."""
        return sum(count for _, count in self._live(now))

    def retry_after(self, now: float, limit: int) -> float:
        """Seconds from `now` until the window holds fewer than `limit` tokens; 0.0 if it does."""
        if limit < 1:
            raise ValueError("a rate limit is at least 1 token")
        live = self._live(now)
        total = sum(count for _, count in live)
        if total < limit:
            return 0.0
        for at, count in live:
            total -= count  # this bucket leaves the window when second `at + 60` begins
            if total < limit:
                return max(0.0, at + _WINDOW - max(now, self._latest))
        return 0.0


# --------------------------------------------------------------------------- the shared store


@dataclass(frozen=True, slots=True)
class Spend:
    """An amount of billed tokens and cost (in integer cost units; `cost` is the currency)."""

    tokens: int = 0
    units: int = 0

    @classmethod
    def of(cls, tokens: int, cost: float) -> Spend:
        """The Spend of `tokens` and `cost` in currency (as a ledger sums them)."""
        return cls(tokens, cost_units(cost))

    @property
    def cost(self) -> float:
        return self.units / COST_UNITS


@dataclass(frozen=True, slots=True)
class Account:
    """One key in one period: what a budget is counted against."""

    key: Key
    start: float

    @property
    def cap_tokens(self) -> int | None:
        return self.key.budget_tokens

    @property
    def cap_units(self) -> int | None:
        cost = self.key.budget_cost
        return None if cost is None else cost_units(cost)


class BudgetStore(Protocol):
    """What the instances of a relay share about each account.

    `reserve` is the only call that may wait (a Redis round trip); the others are synchronous:
    a networked store answers `committed` and `available` from what it last heard (every
    `reserve` reply refreshes it, and it refreshes what it knows in the background) and sends
    `seed` and `settle` in the background. That is safe because only `reserve` hands out
    budget, and it decides on the shared truth. Amounts in a dimension that the key does not
    cap (budget None) are 0 in `available` and in grants.

    `reachable` says whether the store can hand out budget now: a networked store that lost
    its server says False (and grants nothing), so new requests of limited keys are refused
    (503) while the streams running go on within what they hold: budgets fail closed.
    """

    @property
    def reachable(self) -> bool:
        """Whether `reserve` can grant anything now (False: the shared store is lost)."""
        ...

    def seed(self, account: Account, spent: Spend) -> None:
        """Set what the account has spent, read from the ledger at start, unless the store
        already knows the account (another instance seeded it, or streams used it)."""
        ...

    def committed(self, account: Account) -> Spend:
        """What the account has spent and settled (seeded included)."""
        ...

    def available(self, account: Account) -> Spend:
        """What is left to reserve: each cap less committed and reserved (may be negative
        after an input cost overdrew it)."""
        ...

    async def reserve(self, account: Account, need: Spend) -> Spend:
        """Reserve at least `need` in every capped dimension, or nothing at all.

        The store may grant more than `need` (a block) so that the next events need no round
        trip. A networked store also makes the reservation expire if its instance dies.
        """
        ...

    def settle(self, account: Account, reserved: Spend, used: Spend) -> None:
        """Commit `used` and release the whole of `reserved` (what was granted to a pool that
        has no open stream any more). `used` may exceed `reserved` by charged input cost."""
        ...


class _Entry:
    __slots__ = ("committed_tokens", "committed_units", "reserved_tokens", "reserved_units")

    def __init__(self, spent: Spend) -> None:
        self.committed_tokens = spent.tokens
        self.committed_units = spent.units
        self.reserved_tokens = 0
        self.reserved_units = 0


class MemoryBudgetStore:
    """The BudgetStore of one process: a dict.

    `block` None grants a pool all that is left at once (one reservation per pool: exact and
    cheapest in one process). A `block` grants max(need, block) capped by what is left, per
    dimension, as a shared store would; tests use it to model several instances.
    It keeps each key's latest period, and older ones while a reservation on them is open:
    the first reservation in a new period forgets the key's finished ones.
    """

    #: one process's memory is always there
    reachable = True

    def __init__(self, block: Spend | None = None) -> None:
        self.block = block
        self._entries: dict[str, dict[float, _Entry]] = {}

    def _entry(self, account: Account, spent: Spend | None = None) -> _Entry:
        """The account's entry, made (from `spent`) if new; making one forgets the key's older
        periods on which nothing is reserved."""
        periods = self._entries.setdefault(account.key.name, {})
        entry = periods.get(account.start)
        if entry is None:
            entry = periods[account.start] = _Entry(spent or Spend())
            for start in [start for start in periods if start < account.start]:
                old = periods[start]
                if not (old.reserved_tokens or old.reserved_units):
                    del periods[start]
        return entry

    def _peek(self, account: Account) -> _Entry:
        """The account's entry, or an empty one; reading never makes nor forgets one."""
        return self._entries.get(account.key.name, {}).get(account.start) or _Entry(Spend())

    def seed(self, account: Account, spent: Spend) -> None:
        self._entry(account, spent)

    def committed(self, account: Account) -> Spend:
        entry = self._peek(account)
        return Spend(entry.committed_tokens, entry.committed_units)

    def available(self, account: Account) -> Spend:
        entry = self._peek(account)
        cap_tokens, cap_units = account.cap_tokens, account.cap_units
        tokens = 0
        if cap_tokens is not None:
            tokens = cap_tokens - entry.committed_tokens - entry.reserved_tokens
        units = 0
        if cap_units is not None:
            units = cap_units - entry.committed_units - entry.reserved_units
        return Spend(tokens, units)

    async def reserve(self, account: Account, need: Spend) -> Spend:
        return self.reserve_now(account, need)

    def reserve_now(self, account: Account, need: Spend) -> Spend:
        """`reserve`, without the coroutine: the in-memory store never waits."""
        left = self.available(account)
        capped = (account.cap_tokens is not None, account.cap_units is not None)
        wanted = (need.tokens, need.units)
        have = (left.tokens, left.units)
        block = (self.block.tokens, self.block.units) if self.block else None
        grant = [0, 0]
        for dim in (0, 1):
            if not capped[dim]:
                continue
            if wanted[dim] > have[dim] or have[dim] < 0:
                return Spend()
            grant[dim] = (
                have[dim] if block is None else min(have[dim], max(wanted[dim], block[dim]))
            )
        entry = self._entry(account)
        entry.reserved_tokens += grant[0]
        entry.reserved_units += grant[1]
        return Spend(grant[0], grant[1])

    def settle(self, account: Account, reserved: Spend, used: Spend) -> None:
        entry = self._entry(account)
        entry.committed_tokens += used.tokens
        entry.committed_units += used.units
        entry.reserved_tokens -= reserved.tokens
        entry.reserved_units -= reserved.units
