"""Budgets shared through a real Redis: several instances (Budgets on their own stores)
never let a key pass its budget, reserve in blocks, give back what they did not use, lose
to a crash at most a lease (counted as spent), fail closed while Redis is away, and share
their rate windows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from sserelay.cluster import budget as budget_module
from sserelay.cluster.budget import RedisBudgetStore, block_of
from sserelay.cluster.connection import Connection
from sserelay.http.access import Keys, Refusal
from sserelay.metering.budget import Allowance, Budgets, Spend, cost_units
from sserelay.metering.keys import Key, KeyRing, secret_digest
from tests.services import RedisServer

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def auth(secret: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {secret}".encode())


def key(name: str = "alice", **limits: Any) -> Key:
    return Key(name, secret_digest(f"secret-{name}"), **limits)


def run(main: Callable[[], Awaitable[None]], timeout: float = 20) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


class Instance:
    """One relay's view: its Redis connection, its store, its Budgets."""

    def __init__(self, connection: Connection, store: RedisBudgetStore, budgets: Budgets):
        self.connection = connection
        self.store = store
        self.budgets = budgets
        self.warnings: list[str] = []


@asynccontextmanager
async def instances(
    server: RedisServer, *keys: Key, count: int = 2, spent: dict[str, Spend] | None = None
) -> AsyncIterator[list[Instance]]:
    async with AsyncExitStack() as stack:
        made = []
        for n in range(count):
            said: list[str] = []
            connection = await Connection.open(server.url, said.append)
            stack.push_async_callback(connection.aclose)
            store = RedisBudgetStore(connection, f"instance-{n}", said.append)
            budgets = Budgets(KeyRing(keys), store=store, spent=spent, now=NOW)
            await store.start(budgets, NOW)
            stack.push_async_callback(store.aclose)
            one = Instance(connection, store, budgets)
            one.warnings = said
            made.append(one)
        yield made


async def take(allowance: Allowance, tokens: int, cost: float = 0.0) -> bool:
    """The relay's loop for one event: take it here, or ask Redis for more."""
    if allowance.try_take(tokens, cost):
        return True
    return await allowance.refill(tokens, cost) and allowance.try_take(tokens, cost)


async def settled(store: RedisBudgetStore) -> None:
    """Wait until the store's background writes (settlements) are in Redis."""
    while store._writes:
        await asyncio.sleep(0.01)


def test_blocks_are_a_tenth_of_the_budget_within_limits() -> None:
    assert (block_of(None), block_of(30), block_of(5), block_of(10**6, 1000)) == (0, 3, 1, 1000)


@pytest.mark.parametrize("seed", range(3))
def test_interleaved_streams_on_two_instances_never_pass_the_budget(
    redis_server: RedisServer, seed: int
) -> None:
    alice = key("alice", budget_tokens=200, budget_cost=1.0)

    async def main() -> None:
        dice = random.Random(seed)
        async with instances(redis_server, alice) as (one, two):
            streams = [(one if i % 2 else two).budgets.allowance(alice, NOW) for i in range(6)]
            taken = units = 0
            for _ in range(300):
                stream = streams[dice.randrange(6)]
                if stream.closed:
                    continue
                if dice.random() < 0.05:
                    stream.close()
                    continue
                tokens, cost = dice.randint(0, 9), dice.choice([0.0, 0.01, 0.05])
                if await take(stream, tokens, cost):
                    taken += tokens
                    units += cost_units(cost)
                assert taken <= 200 and units <= cost_units(1.0)
            for stream in streams:
                stream.close()
            await settled(one.store)
            await settled(two.store)
            # Everything used is committed, everything reserved and unused given back.
            account = one.budgets.account(alice, NOW)
            await one.store._sync_accounts()
            assert one.store.committed(account) == Spend(taken, units)
            assert one.store.available(account) == Spend(200 - taken, cost_units(1.0) - units)
            assert taken > 200 - 2 * 20  # at most one block (20 tokens) held by each, unused

    run(main)


def test_a_stream_reserves_once_per_block_not_per_event(redis_server: RedisServer) -> None:
    alice = key("alice", budget_tokens=10_000)

    async def main() -> None:
        async with instances(redis_server, alice, count=1) as (one,):
            calls = 0
            reserve = one.store.reserve

            async def counted(*args: Any) -> Spend:
                nonlocal calls
                calls += 1
                return await reserve(*args)

            one.store.reserve = counted  # type: ignore[method-assign,assignment]
            with one.budgets.allowance(alice, NOW) as stream:
                for _ in range(500):
                    assert await take(stream, 5)
            assert calls == 3  # 2,500 tokens in blocks of 1,000

    run(main)


def test_the_ledger_seeds_a_budget_once_for_every_instance(redis_server: RedisServer) -> None:
    alice = key("alice", budget_tokens=100)

    async def main() -> None:
        spent = {"alice": Spend(70, 0)}
        async with instances(redis_server, alice, spent=spent) as (one, two):
            account = one.budgets.account(alice, NOW)
            for instance in (one, two):
                assert instance.store.committed(account) == Spend(70, 0)
                assert instance.budgets.remaining(alice, NOW).tokens == 30
            with one.budgets.allowance(alice, NOW) as stream:
                assert await take(stream, 30) and not await take(stream, 1)
        # A restart seeding the same ledger figure does not give back what was spent since.
        async with instances(redis_server, alice, count=1, spent=spent) as (again,):
            assert again.budgets.remaining(alice, NOW).tokens == 0

    run(main)


def test_a_crashed_instances_lease_expires_counted_as_spent(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_module, "LEASE_TTL", 0.3)
    alice = key("alice", budget_tokens=100)

    async def main() -> None:
        async with instances(redis_server, alice) as (dying, survivor):
            stream = dying.budgets.allowance(alice, NOW)
            assert await take(stream, 4)  # a block of 10 reserved, 4 delivered
            # The instance dies: no settle, no renewal.
            for task in (dying.store._task, dying.store._writer):
                assert task is not None
                task.cancel()
            account = survivor.budgets.account(alice, NOW)
            await survivor.store._sync_accounts()
            assert survivor.budgets.remaining(alice, NOW).tokens == 90  # reserved elsewhere
            await asyncio.sleep(0.4)
            await survivor.store._sync_accounts()
            # Expired: the whole lease counts as spent (it may all have been delivered).
            assert survivor.store.committed(account) == Spend(10, 0)
            assert survivor.budgets.remaining(alice, NOW).tokens == 90
            stream._pool = None  # what died with the instance

    run(main)


def test_a_lease_renewed_while_its_stream_runs_does_not_expire(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget_module, "LEASE_TTL", 0.3)
    monkeypatch.setattr(budget_module, "SYNC_EVERY", 0.05)
    alice = key("alice", budget_tokens=100)

    async def main() -> None:
        async with instances(redis_server, alice, count=1) as (one,):
            with one.budgets.allowance(alice, NOW) as stream:
                assert await take(stream, 4)
                await asyncio.sleep(0.6)  # twice the TTL, renewed meanwhile
                assert await take(stream, 4)
            await settled(one.store)
            await one.store._sync_accounts()
            assert one.store.committed(one.budgets.account(alice, NOW)) == Spend(8, 0)

    run(main)


def test_redis_lost_fails_closed_for_new_requests_and_open_streams_use_what_they_hold(
    redis_server: RedisServer,
) -> None:
    alice = key("alice", budget_tokens=1000)
    bob = key("bob")  # no limits: no budget to check, never refused for Redis

    async def main() -> None:
        async with instances(redis_server, alice, bob, count=1) as (one,):
            keys = Keys(one.budgets.ring, one.budgets, record_refusals=True)

            def identify(who: Key) -> Key | Refusal:
                secret = f"secret-{who.name}"
                return keys.identify(
                    {"type": "http", "headers": [auth(secret)], "query_string": b""}
                )

            assert identify(alice) == alice
            stream = one.budgets.allowance(alice, NOW)
            assert await take(stream, 10)  # a block of 100 held here
            redis_server.stop()
            await asyncio.sleep(0.7)  # a sync finds it gone
            assert not one.store.reachable and len(one.warnings) == 1
            refusal = identify(alice)
            assert isinstance(refusal, Refusal)
            assert (refusal.status, refusal.reason) == (503, None)  # billed nothing
            assert dict(refusal.headers)[b"retry-after"] == b"2"
            assert identify(bob) == bob
            assert await take(stream, 90)  # what it holds
            assert not await take(stream, 1)  # and nothing more
            stream.close()
            await asyncio.to_thread(redis_server.start)
            await asyncio.sleep(0.7)
            assert one.store.reachable and "is back" in one.warnings[-1]
            assert identify(alice) == alice

    run(main)


def test_rate_windows_are_shared_between_instances(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = key("alice", tokens_per_minute=100)

    async def main() -> None:
        async with instances(redis_server, alice) as (one, two):
            with one.budgets.allowance(alice, NOW) as stream:
                assert stream.try_take(60)
            with two.budgets.allowance(alice, NOW) as stream:
                assert stream.try_take(50)
            now = one.budgets.clock()
            for instance in (one, two):
                await instance.store._sync_rates()
            await one.store._sync_rates()  # hears what two added after its own sync
            for instance in (one, two):
                assert instance.budgets.windows["alice"].used(now) == 110
                refused = instance.budgets.admit(alice, None, now)
                assert refused.reason == "rate_limited"

    run(main)
