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

from sserelay.metering.accounts import (
    COST_UNITS,
    Account,
    BudgetStore,
    MemoryBudgetStore,
    RateWindow,
    Spend,
    cost_units,
    iso_moment,
    next_reset,
    period_start,
)
from sserelay.metering.keys import Key, KeyRing

from .admission import Admission, KeyStatus, Refusal, Remaining

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
                    f"it resets at {iso_moment(reset)}"
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
