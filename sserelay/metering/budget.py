"""Budgets and rate limits: who may start a stream now, and how much one stream may take.

Time is epoch seconds (what `time.time()` returns), which is UTC by definition; periods are
UTC calendar hours, days and months. The policy, in the order `Budgets.admit` applies it:

    no key, or an unknown one            401 unauthorized
    a model the key may not use          403 forbidden
    the period's budget already spent    429 budget_exhausted  (retry-after: the reset)
    tokens_per_minute already reached    429 rate_limited      (retry-after: the window)

A stream that was admitted then takes its tokens from an `Allowance`, one event at a time:
`try_take` is synchronous and O(1), takes the whole amount or nothing, and all the streams of
one key together never take more than its budget. The relay sends an event only once
`try_take` said yes, so the budget is never passed by a delivered token.

Accounting is in two parts, so that a store shared by several instances (Redis, issue 16) can
replace the in-memory one without touching the per-event path:

- `BudgetStore` holds what every instance shares for each key and period ("account"): what
  was spent and settled, and what is reserved by streams still running. `reserve` is the only
  call that may wait on a network; it is awaited only when the local reserve runs out.
- Each `Budgets` (one per process) keeps a pool per account: the reservation it got from the
  store, and what its open streams used of it. All the key's streams in this process share
  the pool, so no stream is refused while another one of this process holds unused budget.
  When the last stream of a pool closes, the pool settles: it commits what was used and
  returns the rest. `MemoryBudgetStore` grants a pool everything that is left at once, so with
  one process the pool is simply the key's exact shared counter.

Decisions:

- A stream's tokens and cost count toward the period in which it was admitted, also the part
  delivered after the period rolled over. A ledger row has one start time, so a restart that
  sums the rows started in this period (`period_start`) finds exactly what was counted here.
- Cost is kept in integer units of 1e-12 (`COST_UNITS` per currency unit): sums are exact, so
  a budget of 2.5 is reached, not passed, by twenty-five 0.1 costs (floats make 2.5000000000000004).
  Each event's cost is rounded to the nearest unit, at most 0.5e-12 away from the bill's float.
- `charge_input(cost)` charges a request's input cost when the upstream reports it and never
  refuses: the input was spent upstream already. It can leave a cost budget overdrawn; then
  the stream is cut at its next event that costs anything, and the key's next requests are
  refused until the reset. So a cost budget can be passed by the input cost of the request
  that crosses it, never by output delivered.
- `tokens_per_minute` counts billed tokens in one-second buckets over the last 60 seconds. It
  refuses new requests only: it never cuts a running stream. With several instances, each
  counts its own tokens per event and a shared store adds what the others counted
  (`RateWindow.set_elsewhere`), as last heard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import NamedTuple, Protocol

from sserelay.metering.keys import Key, KeyRing, Period

__all__ = [
    "COST_UNITS",
    "Account",
    "Admission",
    "Allowance",
    "BudgetStore",
    "Budgets",
    "KeyStatus",
    "MemoryBudgetStore",
    "RateWindow",
    "Refusal",
    "Remaining",
    "Spend",
    "cost_units",
    "next_reset",
    "period_start",
]

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


def _iso(moment: float) -> str:
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


# --------------------------------------------------------------------------- admission


class Refusal(StrEnum):
    """Why a request was refused; the values are the bill's and the ledger's reasons."""

    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    BUDGET_EXHAUSTED = "budget_exhausted"
    RATE_LIMITED = "rate_limited"


_STATUS = {
    Refusal.UNAUTHORIZED: 401,
    Refusal.FORBIDDEN: 403,
    Refusal.BUDGET_EXHAUSTED: 429,
    Refusal.RATE_LIMITED: 429,
}


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to "may this request start?": `ok`, or a `reason` with what to tell the client.

    `status` is the HTTP status (200 when ok). `retry_after` is whole seconds for a
    `Retry-After` header, at least 1; None when waiting will not help (401, 403, or a "total"
    budget that is spent). `message` is one line that names the key and says why.
    """

    key: Key | None
    reason: Refusal | None = None
    retry_after: int | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def status(self) -> int:
        return 200 if self.reason is None else _STATUS[self.reason]


class Remaining(NamedTuple):
    """What a key may still spend this period; None in a dimension it does not cap. Never < 0."""

    tokens: int | None
    cost: float | None


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One row of `sserelay keys status` (and the figures behind `/metrics`)."""

    name: str
    period: Period
    budget_tokens: int | None
    budget_cost: float | None
    spent_tokens: int
    spent_cost: float
    remaining_tokens: int | None
    remaining_cost: float | None
    resets_at: float | None
    tokens_per_minute: int | None
    tokens_last_minute: int | None


def _model_shown(model: str) -> str:
    """A client-chosen model name, safe in a one-line message."""
    return repr(model if len(model) <= 80 else model[:79] + "…")


# --------------------------------------------------------------------------- per process


class _Pool:
    """One account in this process: its reservation, and what its open streams used of it.

    `held_*` is what may still be taken without asking the store (math.inf where the key has no
    cap); `granted_*` all that the store reserved for this pool; `used_*` what was taken.
    """

    __slots__ = (
        "account",
        "granted_tokens",
        "granted_units",
        "held_tokens",
        "held_units",
        "open",
        "used_tokens",
        "used_units",
    )

    def __init__(self, account: Account) -> None:
        self.account = account
        self.held_tokens: float = 0 if account.cap_tokens is not None else math.inf
        self.held_units: float = 0 if account.cap_units is not None else math.inf
        self.granted_tokens = 0
        self.granted_units = 0
        self.used_tokens = 0
        self.used_units = 0
        self.open = 0


class Allowance:
    """What one stream of one key may take, event by event. Close it when the stream ends.

    The relay's loop:

        if not allowance.try_take(tokens, cost):
            if not await allowance.refill(tokens, cost):
                ...  # budget exhausted: do not send this event; cut the stream
            allowance.try_take(tokens, cost)  # True: nothing ran in between

    `tokens` and `cost` are what this stream took (input cost charged included).
    """

    __slots__ = ("_budgets", "_clock", "_pool", "_window", "account", "tokens", "units")

    def __init__(self, budgets: Budgets, pool: _Pool, window: RateWindow | None) -> None:
        self._budgets = budgets
        self._clock = budgets.clock
        self._pool: _Pool | None = pool
        self._window = window
        self.account = pool.account
        self.tokens = 0
        self.units = 0
        pool.open += 1

    @property
    def key(self) -> Key:
        return self.account.key

    @property
    def cost(self) -> float:
        return self.units / COST_UNITS

    @property
    def closed(self) -> bool:
        return self._pool is None

    @property
    def reachable(self) -> bool:
        """Whether the budget's store can grant more now (see BudgetStore.reachable)."""
        return self._budgets.store.reachable

    def _live(self) -> _Pool:
        if self._pool is None:
            raise ValueError("this allowance is closed")
        return self._pool

    def try_take(self, tokens: int, cost: float = 0.0) -> bool:
        """Take `tokens` and `cost` now if this process holds enough of the key's budget.

        All or nothing; False changes nothing (then `refill` asks the store). O(1), no waiting.
        """
        # The per-event path: kept to plain attribute arithmetic (bench/ measures it).
        pool = self._pool
        if pool is None:
            raise ValueError("this allowance is closed")
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        units = cost_units(cost) if cost else 0
        if tokens > pool.held_tokens or units > pool.held_units:
            return False
        pool.held_tokens -= tokens
        pool.used_tokens += tokens
        self.tokens += tokens
        if units:
            pool.held_units -= units
            pool.used_units += units
            self.units += units
        if tokens and self._window is not None:
            self._window.add(tokens, self._clock())
        return True

    async def refill(self, tokens: int, cost: float = 0.0) -> bool:
        """Reserve from the store what `try_take(tokens, cost)` lacks; False if the key's
        budget cannot cover it. Call it only after try_take said no: with a shared store it
        costs a round trip. After True, `try_take(tokens, cost)` succeeds if nothing is awaited
        in between."""
        pool = self._live()
        units = cost_units(cost) if cost else 0
        while True:
            need_tokens = max(0, tokens - pool.held_tokens)
            need_units = max(0, units - pool.held_units)
            if not (need_tokens or need_units):
                return True
            granted_before = (pool.granted_tokens, pool.granted_units)
            grant = await self._budgets.store.reserve(
                pool.account, Spend(int(need_tokens), int(need_units))
            )
            if grant.tokens or grant.units:
                pool.granted_tokens += grant.tokens
                pool.granted_units += grant.units
                pool.held_tokens += grant.tokens
                pool.held_units += grant.units
            elif granted_before == (pool.granted_tokens, pool.granted_units):
                return False
            # Look again: while this stream waited, others of the pool may have taken from it,
            # or refilled it (so the store had nothing left for this one).

    def charge_input(self, cost: float) -> None:
        """Charge a reported input cost. Never refuses; may overdraw the cost budget (see the
        module's docstring): then the next event that costs anything is refused."""
        pool = self._live()
        units = cost_units(cost)
        pool.held_units -= units
        pool.used_units += units
        self.units += units

    def close(self) -> None:
        """End this stream's use of the budget; the last stream of a pool settles it with the
        store (used committed, the unused rest returned). Closing twice does nothing."""
        pool = self._pool
        if pool is None:
            return
        self._pool = None
        pool.open -= 1
        if pool.open == 0:
            self._budgets._settle(pool)

    def __enter__(self) -> Allowance:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Budgets:
    """The budget and rate-limit state of one relay process, over the keys of `ring`.

    `spent` seeds each key's spend in the period holding `now` (default: the clock), as summed
    from the ledger at start; names not in the ring are ignored. `clock` (epoch seconds) stamps
    the tokens of the per-event path in the rate windows; the other methods take `now`.
    """

    def __init__(
        self,
        ring: KeyRing,
        *,
        store: BudgetStore | None = None,
        spent: Mapping[str, Spend] | None = None,
        now: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ring = ring
        self.store: BudgetStore = MemoryBudgetStore() if store is None else store
        self.clock = clock
        self._pools: dict[tuple[str, float], _Pool] = {}
        self._windows = {key.name: RateWindow() for key in ring if key.tokens_per_minute}
        if spent:
            at = clock() if now is None else now
            for key in ring:
                if key.name in spent:
                    self.store.seed(self._account(key, at), spent[key.name])

    @property
    def windows(self) -> Mapping[str, RateWindow]:
        """The rate window of each key with `tokens_per_minute`, by key name."""
        return self._windows

    @staticmethod
    def _account(key: Key, now: float) -> Account:
        return Account(key, period_start(key.period, now))

    def account(self, key: Key, now: float) -> Account:
        """What `key`'s budget is counted against in the period holding `now`."""
        return self._account(key, now)

    def _settle(self, pool: _Pool) -> None:
        account = pool.account
        self.store.settle(
            account,
            reserved=Spend(pool.granted_tokens, pool.granted_units),
            used=Spend(pool.used_tokens, pool.used_units),
        )
        if self._pools.get((account.key.name, account.start)) is pool:
            del self._pools[account.key.name, account.start]

    def allowance(self, key: Key, now: float) -> Allowance:
        """Open the budget of one stream of `key`, admitted at `now` (whose period it counts
        toward until it closes)."""
        account = self._account(key, now)
        pool = self._pools.get((key.name, account.start))
        if pool is None:
            pool = self._pools[key.name, account.start] = _Pool(account)
        return Allowance(self, pool, self._windows.get(key.name))

    def spent(self, key: Key, now: float) -> Spend:
        """What `key` spent in the period holding `now`: settled, plus its open streams here."""
        account = self._account(key, now)
        committed = self.store.committed(account)
        pool = self._pools.get((key.name, account.start))
        if pool is None:
            return committed
        return Spend(committed.tokens + pool.used_tokens, committed.units + pool.used_units)

    def _remaining_units(self, key: Key, now: float) -> tuple[int | None, int | None]:
        account = self._account(key, now)
        available = self.store.available(account)
        pool = self._pools.get((key.name, account.start))
        tokens: int | None = None
        if key.budget_tokens is not None:
            held = int(pool.held_tokens) if pool else 0
            tokens = max(0, available.tokens + held)
        units: int | None = None
        if key.budget_cost is not None:
            held = int(pool.held_units) if pool else 0
            units = max(0, available.units + held)
        return tokens, units

    def remaining(self, key: Key, now: float) -> Remaining:
        """What `key` may still spend in the period holding `now` (None: no such budget)."""
        tokens, units = self._remaining_units(key, now)
        return Remaining(tokens, None if units is None else units / COST_UNITS)

    def admit(self, key: Key | None, model: str | None, now: float) -> Admission:
        """May a request for `model`, presenting `key` (None: missing or unknown), start now?"""
        if key is None:
            return Admission(None, Refusal.UNAUTHORIZED, None, "missing or unknown key")
        if not key.allows_model(model):
            allowed = ", ".join(key.models)
            if model:
                why = f"key {key.name!r} may not use model {_model_shown(model)}"
            else:
                why = f"key {key.name!r} is limited to some models and the request names none"
            return Admission(key, Refusal.FORBIDDEN, None, f"{why}; it may use: {allowed}")

        tokens, units = self._remaining_units(key, now)
        if (tokens is not None and tokens <= 0) or (units is not None and units <= 0):
            if tokens is not None and tokens <= 0:
                budget = f"budget of {key.budget_tokens} tokens"
            else:
                budget = f"cost budget of {key.budget_cost:g}"
            reset = next_reset(key.period, now)
            if reset is None:
                message = f"key {key.name!r} has spent its {budget}; it does not reset"
                retry = None
            else:
                message = (
                    f"key {key.name!r} has spent its {key.period.value} {budget}; "
                    f"it resets at {_iso(reset)}"
                )
                retry = max(1, math.ceil(reset - now))
            return Admission(key, Refusal.BUDGET_EXHAUSTED, retry, message)

        limit = key.tokens_per_minute
        window = self._windows.get(key.name)
        if limit is not None and window is not None and window.used(now) >= limit:
            retry = max(1, math.ceil(window.retry_after(now, limit)))
            message = (
                f"key {key.name!r} has reached its rate limit of {limit} tokens per minute; "
                f"retry in {retry} s"
            )
            return Admission(key, Refusal.RATE_LIMITED, retry, message)
        return Admission(key)

    def status(self, now: float) -> list[KeyStatus]:
        """One row per key, in the ring's order, for the period holding `now`."""
        rows = []
        for key in self.ring:
            spent = self.spent(key, now)
            remaining = self.remaining(key, now)
            window = self._windows.get(key.name)
            rows.append(
                KeyStatus(
                    name=key.name,
                    period=key.period,
                    budget_tokens=key.budget_tokens,
                    budget_cost=key.budget_cost,
                    spent_tokens=spent.tokens,
                    spent_cost=spent.cost,
                    remaining_tokens=remaining.tokens,
                    remaining_cost=remaining.cost,
                    resets_at=next_reset(key.period, now),
                    tokens_per_minute=key.tokens_per_minute,
                    tokens_last_minute=None if window is None else window.used(now),
                )
            )
        return rows
