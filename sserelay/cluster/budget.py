"""`RedisBudgetStore`: keys' budgets and rate windows shared by every instance on one Redis.

What each account (a key in one period) has spent and what is reserved live in Redis, and
change only through Lua scripts (scripts.py), each atomic: two instances can never both be
granted the last of a budget. The per-event path never waits on Redis: a stream's
`Allowance` takes from what its instance holds (`Budgets` keeps one pool per account), and
only when that runs out does `reserve` make a round trip, for a block (a tenth of the
budget, up to 1,000 tokens) so that the next events need none.

- **Leases.** What an instance reserves for an account is one lease, `INSTANCE:N`, with a
  time to live (`LEASE_TTL`) that the instance renews while the lease is open. When the
  account's last stream in the instance ends, the lease is settled: what was used is
  committed, the rest returned. A lease that expires (its instance died) is counted as
  spent in full: the dead instance may have delivered all of it. So the worst case over a
  budget is **zero tokens delivered**; the worst case under it is one block per instance
  that died or was cut off from Redis longer than the TTL (the lease it held, unused).
- **Sync.** Every `SYNC_EVERY` seconds the store renews its leases, refreshes what it knows
  of every account it has seen (so a request is admitted on figures at most that old), and
  exchanges rate-window counts: its own per-second tokens are added to a per-key hash, and
  what the other instances added comes back into each `RateWindow`.
- **Redis lost.** `reserve` grants nothing and `reachable` is False (one warning line, from
  the connection's Health): new requests of limited keys are refused with 503; running
  streams go on within what their instance holds. Settlements wait and are sent when Redis
  is back; a lease whose instance is away past its TTL counts as spent, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import RedisError

from sserelay.metering.budget import Account, Budgets, RateWindow, Spend, next_reset

from .connection import FAILED, UNAVAILABLE, Backoff, Connection, check_cancelled, describe
from .errors import RedisUnavailable
from .keys import budget_account, budget_leases, rate_window
from .scripts import RENEW, RESERVE, SEED, SETTLE

#: Seconds a lease lives without being renewed; the store renews it about every third of it.
LEASE_TTL = 30.0
#: Seconds between syncs (refreshed figures, renewed leases, rate windows exchanged).
SYNC_EVERY = 0.5
#: Keys of an account with a period live this long past its end (a stream admitted in the
#: period counts toward it until it closes, even after the period has rolled over).
KEEP_AFTER_PERIOD = 86_400
#: Rate window counts live this long in Redis (seconds).
RATE_TTL_MS = 120_000
#: Largest block of tokens reserved at once.
MAX_BLOCK_TOKENS = 1000

AccountId = tuple[str, float]


def block_of(cap: int | None, most: int | None = None) -> int:
    """What one reservation asks for beyond its need in a dimension capped at `cap`: a
    tenth of it (at least 1, at most `most`); 0 where there is no cap."""
    if cap is None:
        return 0
    block = max(1, cap // 10)
    return block if most is None else min(block, most)


@dataclass(slots=True)
class _Known:
    """An account as last heard from Redis."""

    account: Account
    committed_tokens: int = 0
    committed_units: int = 0
    reserved_tokens: int = 0
    reserved_units: int = 0
    #: this instance's open lease on it, and what was granted to it
    lease: str | None = None
    granted_tokens: int = 0
    granted_units: int = 0

    def heard(self, state: list[Any]) -> None:
        self.committed_tokens, self.committed_units = int(state[0]), int(state[1])
        self.reserved_tokens, self.reserved_units = int(state[2]), int(state[3])


class RedisBudgetStore:
    """A BudgetStore shared through Redis (see the module). `instance` names this
    instance's leases; `warn` hears of a write Redis refused (a bug, not an outage).
    `start(budgets)` primes it before the run listens (RedisUnavailable if it cannot);
    `aclose()` sends what is left to send."""

    def __init__(self, connection: Connection, instance: str, warn: Callable[[str], None]) -> None:
        self._connection = connection
        self._instance = instance
        self._warn = warn
        client = connection.client
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._seed = client.register_script(SEED)
        self._renew = client.register_script(RENEW)
        self._known: dict[AccountId, _Known] = {}
        self._leases = 0
        self._writes: list[Callable[[], Awaitable[object]]] = []  # in order, retried
        self._wake = asyncio.Event()
        self._windows: dict[str, RateWindow] = {}
        self._sent: dict[str, dict[int, int]] = {}  # tokens this instance added, per second
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        connection.health.consequences.append(
            "new requests of keys with a budget or rate limit get 503 (running streams go on "
            "within what this instance holds)"
        )

    # ------------------------------------------------------------------ the life cycle

    async def start(self, budgets: Budgets, now: float | None = None) -> None:
        """Send the seeds `budgets` made, read every limited key's account, and begin the
        sync. RedisUnavailable if Redis fails meanwhile."""
        self._windows = dict(budgets.windows)
        at = time.time() if now is None else now
        for key in budgets.ring:
            if key.limited:
                self._get(budgets.account(key, at))
        try:
            await self._flush_writes()
            await self._sync_accounts()
        except FAILED as exc:
            raise RedisUnavailable(
                f"cannot share budgets on redis {self._connection.display}: {describe(exc)}"
            ) from None
        self._task = asyncio.create_task(self._sync_loop())
        self._writer = asyncio.create_task(self._write_loop())

    async def aclose(self, grace: float = 2.0) -> None:
        """Stop syncing; send what waits (settlements) if Redis answers within `grace`."""
        for task in (self._task, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(TimeoutError, *FAILED):
            async with asyncio.timeout(grace):
                await self._flush_writes()

    # ------------------------------------------------------------------ the protocol

    @property
    def reachable(self) -> bool:
        return self._connection.health.available

    def seed(self, account: Account, spent: Spend) -> None:
        known = self._get(account)
        if not (known.committed_tokens or known.committed_units):
            known.committed_tokens, known.committed_units = spent.tokens, spent.units
        keys, expire = self._keys(account), self._expire_at(account)

        async def write() -> None:
            known.heard(await self._seed(keys=keys, args=[spent.tokens, spent.units, expire]))

        self._write(write)

    def committed(self, account: Account) -> Spend:
        known = self._get(account)
        return Spend(known.committed_tokens, known.committed_units)

    def available(self, account: Account) -> Spend:
        known = self._get(account)
        tokens = units = 0
        if account.cap_tokens is not None:
            tokens = account.cap_tokens - known.committed_tokens - known.reserved_tokens
        if account.cap_units is not None:
            units = account.cap_units - known.committed_units - known.reserved_units
        return Spend(tokens, units)

    async def reserve(self, account: Account, need: Spend) -> Spend:
        known = self._get(account)
        if known.lease is None:
            self._leases += 1
            known.lease = f"{self._instance}:{self._leases}"
        caps = (account.cap_tokens, account.cap_units)
        args: list[str | int] = [
            known.lease,
            need.tokens,
            need.units,
            "" if caps[0] is None else caps[0],
            "" if caps[1] is None else caps[1],
            block_of(caps[0], MAX_BLOCK_TOKENS),
            block_of(caps[1]),
            int(LEASE_TTL * 1000),
            self._expire_at(account),
        ]
        try:
            reply = cast(list[Any], await self._reserve(keys=self._keys(account), args=args))
        except FAILED as exc:
            check_cancelled()
            self._connection.health.lost(exc)
            return Spend()  # fail closed: nothing is granted that Redis did not grant
        check_cancelled()
        self._connection.health.ok()
        granted = Spend(int(reply[0]), int(reply[1]))
        known.heard(reply[2:])
        known.granted_tokens += granted.tokens
        known.granted_units += granted.units
        return granted

    def settle(self, account: Account, reserved: Spend, used: Spend) -> None:
        known = self._get(account)
        lease = known.lease or f"{self._instance}:none"
        granted = Spend(known.granted_tokens, known.granted_units)
        known.lease, known.granted_tokens, known.granted_units = None, 0, 0
        # Until Redis answers, count it here as it will be there (admissions see it now).
        known.committed_tokens += used.tokens
        known.committed_units += used.units
        known.reserved_tokens = max(0, known.reserved_tokens - reserved.tokens)
        known.reserved_units = max(0, known.reserved_units - reserved.units)
        keys, expire = self._keys(account), self._expire_at(account)
        args: list[str | int] = [
            lease,
            used.tokens,
            used.units,
            expire,
            granted.tokens,
            granted.units,
        ]

        async def write() -> None:
            known.heard(await self._settle(keys=keys, args=args))

        self._write(write)

    # ------------------------------------------------------------------ background

    def _write(self, write: Callable[[], Awaitable[object]]) -> None:
        self._writes.append(write)
        self._wake.set()

    async def _flush_writes(self) -> None:
        while self._writes:
            try:
                await self._writes[0]()
            except UNAVAILABLE:
                raise
            except RedisError as exc:  # refused for good (not lost): say so, go on
                self._warn(f"a budget write was refused by redis: {describe(exc)}")
            self._writes.pop(0)

    async def _write_loop(self) -> None:
        """Seeds and settlements, in order, each until Redis has it."""
        backoff = Backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush_writes()
            except UNAVAILABLE as exc:
                check_cancelled()
                self._connection.health.lost(exc)
                await backoff.wait()
                self._wake.set()
                continue
            check_cancelled()
            self._connection.health.ok()
            backoff.reset()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_EVERY)
            try:
                await self._sync_accounts()
                await self._sync_rates()
            except FAILED as exc:
                check_cancelled()
                self._connection.health.lost(exc)
                continue
            check_cancelled()
            self._connection.health.ok()

    async def _sync_accounts(self) -> None:
        """Renew this instance's leases and hear every known account again (expired leases
        of dead instances are counted as spent on the way), in one round trip."""
        if not self._known:
            await self._connection.client.ping()  # still tells whether Redis is there
            return
        self._forget_old()
        known = list(self._known.values())
        async with self._connection.client.pipeline(transaction=False) as pipe:
            for entry in known:
                leases = [] if entry.lease is None else [entry.lease]
                await self._renew(
                    keys=self._keys(entry.account),
                    args=[int(LEASE_TTL * 1000), *leases],
                    client=pipe,
                )
            replies = await pipe.execute()
        for entry, state in zip(known, replies, strict=True):
            entry.heard(state)

    def _forget_old(self) -> None:
        """Accounts of periods that are over and hold no lease of ours: not heard again."""
        now = time.time()
        for account_id, entry in list(self._known.items()):
            reset = next_reset(entry.account.key.period, entry.account.start)
            if reset is not None and reset <= now and entry.lease is None:
                del self._known[account_id]

    async def _sync_rates(self) -> None:
        """Add this instance's new rate-window tokens to Redis and hear the others'."""
        if not self._windows:
            return
        now = time.time()
        queued = 0
        reads: dict[str, tuple[int, dict[int, int]]] = {}  # the HGETALL's place, the deltas
        async with self._connection.client.pipeline(transaction=False) as pipe:
            for name, window in self._windows.items():
                key = rate_window(name)
                sent = self._sent.setdefault(name, {})
                deltas = {}
                for second, count in window.local(now):
                    if (delta := count - sent.get(second, 0)) > 0:
                        deltas[second] = delta
                        pipe.hincrby(key, str(second), delta)
                        queued += 1
                pipe.pexpire(key, RATE_TTL_MS)
                pipe.hgetall(key)
                reads[name] = (queued + 1, deltas)
                queued += 2
            replies = await pipe.execute()
        oldest = math.floor(now) - 60
        for name, (at, deltas) in reads.items():
            sent = self._sent[name]
            for second, delta in deltas.items():
                sent[second] = sent.get(second, 0) + delta
            for second in [second for second in sent if second <= oldest]:
                del sent[second]
            elsewhere = {}
            for field, value in cast(dict[bytes, bytes], replies[at]).items():
                second = int(field)
                if second > oldest:
                    elsewhere[second] = int(value) - sent.get(second, 0)
            self._windows[name].set_elsewhere(elsewhere)

    # ------------------------------------------------------------------ helpers

    def _get(self, account: Account) -> _Known:
        account_id = (account.key.name, account.start)
        known = self._known.get(account_id)
        if known is None:
            known = self._known[account_id] = _Known(account)
        return known

    @staticmethod
    def _keys(account: Account) -> list[str]:
        name, start = account.key.name, account.start
        return [budget_account(name, start), budget_leases(name, start)]

    @staticmethod
    def _expire_at(account: Account) -> int | str:
        reset = next_reset(account.key.period, account.start)
        return "" if reset is None else int((reset + KEEP_AFTER_PERIOD) * 1000)
