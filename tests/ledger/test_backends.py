"""What every backend (SQLite, JSON Lines, PostgreSQL) does alike, against the real thing."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sserelay.ledger import LedgerError, QueuedLedger, UsageRow
from sserelay.ledger.store import Write
from tests.ledger.conftest import T0, Backend, fixed_clock, make_row, run

ROOT = Path(__file__).resolve().parents[2]


def full_row(instance: str = "a") -> UsageRow:
    """A finished row with every column set, and 0 where 0 is not None."""
    return make_row(
        instance,
        first_token_at=T0 + timedelta(milliseconds=5),
        ended_at=T0 + timedelta(seconds=2, microseconds=7),
        client="[2001:db8::1]:51234",
        key="ключ-team",
        method="POST",
        path="/v1/chat/completions?x=🙂",
        model="gpt-4o-mini",
        status=200,
        reason="complete",
        tokens=42,
        events=43,
        bytes=4096,
        tokenizer="o200k",
        input_tokens=0,
        output_tokens=42,
        cached_tokens=None,
        usage_source="reported",
        cost=0.000123456789,
        last_event_id="43",
    )


def test_every_column_round_trips_with_none_and_zero_kept_apart(backend: Backend) -> None:
    rich = full_row()
    bare = make_row(cost=0.0, input_tokens=None, output_tokens=0, cached_tokens=0)

    async def scenario() -> list[UsageRow]:
        async with backend.ledger("a") as ledger:
            await ledger.start(bare)
            await ledger.finish(rich)
        async with backend.ledger(None) as reader:
            return await reader.query()

    stored = run(scenario())
    assert stored == [rich, bare]  # oldest first
    assert stored[1].cost == 0.0 and stored[1].input_tokens is None
    assert stored[1].output_tokens == 0 and stored[1].cached_tokens == 0
    assert stored[0].started_at.tzinfo is UTC


def test_checkpoint_updates_open_rows_and_finish_ends_them(backend: Backend) -> None:
    rows = [make_row() for _ in range(3)]

    async def scenario() -> list[UsageRow]:
        async with backend.ledger("a") as ledger:
            for row in rows:
                await ledger.start(row)
            await ledger.checkpoint([replace(row, tokens=5, events=5, bytes=50) for row in rows])
            await ledger.finish(
                replace(rows[0], tokens=9, events=9, bytes=90, reason="complete", ended_at=T0)
            )
            # gathered before that finish, applied after it: must not reopen the row
            await ledger.checkpoint([replace(rows[0], tokens=7)])
            stored = await ledger.query()
            for row in rows[1:]:
                await ledger.finish(replace(row, reason="interrupted", ended_at=T0))
            return stored

    stored = run(scenario())
    assert [(row.tokens, row.reason) for row in stored] == [
        (9, "complete"),
        (5, None),
        (5, None),
    ]


def test_a_checkpoint_of_many_rows_is_one_transaction(backend: Backend) -> None:
    rows = [make_row() for _ in range(1000)]
    batches: list[int] = []

    async def scenario() -> list[UsageRow]:
        async with backend.ledger("a") as ledger:
            await asyncio.gather(*(ledger.start(row) for row in rows))
            store = ledger._store
            write = store.write

            async def counting(batch: Sequence[Write]) -> None:
                batches.append(len(batch))
                await write(batch)

            store.write = counting  # type: ignore[method-assign]
            await ledger.checkpoint([replace(row, tokens=3) for row in rows])
            return await ledger.query()

    stored = run(scenario())
    assert batches == [1000]
    assert sum(row.tokens for row in stored) == 3000


def test_concurrent_writes_share_transactions(backend: Backend) -> None:
    rows = [make_row() for _ in range(200)]
    batches: list[int] = []

    async def scenario() -> int:
        async with backend.ledger("a") as ledger:
            store = ledger._store
            write = store.write

            async def counting(batch: Sequence[Write]) -> None:
                batches.append(len(batch))
                await write(batch)

            store.write = counting  # type: ignore[method-assign]
            await asyncio.gather(*(ledger.start(row) for row in rows))
            return len(await ledger.query())

    assert run(scenario()) == 200
    assert sum(batches) == 200 and len(batches) < 20, batches


def test_a_reused_request_id_makes_a_second_row_and_a_duplicate_open_row_is_refused(
    backend: Backend,
) -> None:
    first = make_row(id="client-chosen")
    again = replace(first, started_at=first.started_at + timedelta(seconds=1))

    async def scenario() -> list[UsageRow]:
        async with backend.ledger("a") as ledger:
            await ledger.start(first)
            with pytest.raises(LedgerError, match="already open"):
                await ledger.start(first)
            await ledger.start(again)  # the same id at once, started later: its own row
            await ledger.finish(replace(first, tokens=1, reason="complete", ended_at=T0))
            await ledger.finish(replace(again, tokens=2, reason="complete", ended_at=T0))
            return await ledger.query()

    assert [(row.id, row.tokens) for row in run(scenario())] == [
        ("client-chosen", 1),
        ("client-chosen", 2),
    ]


def test_two_instances_share_one_ledger(backend: Backend) -> None:
    async def scenario() -> tuple[list[UsageRow], list[UsageRow]]:
        async with backend.ledger("a") as one, backend.ledger("b") as two:
            same_id = make_row("a", id="shared")
            await one.start(same_id)
            await two.start(replace(same_id, instance="b"))
            await one.finish(replace(same_id, tokens=1, reason="complete", ended_at=T0))
            seen_by_two = await two.query()
            await two.finish(
                replace(same_id, instance="b", tokens=2, reason="complete", ended_at=T0)
            )
        async with backend.ledger(None) as reader:
            return seen_by_two, await reader.query()

    seen_by_two, stored = run(scenario())
    assert {(row.instance, row.tokens, row.reason) for row in seen_by_two} == {
        ("a", 1, "complete"),
        ("b", 0, None),
    }
    assert {(row.instance, row.tokens) for row in stored} == {("a", 1), ("b", 2)}


def test_recover_closes_a_dead_instances_rows_as_crashed_with_their_checkpoint(
    backend: Backend,
) -> None:
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    dead_rows = [make_row("dead") for _ in range(3)]
    live_row = make_row("live")
    own_row = make_row("me")

    async def scenario() -> tuple[int, int, list[UsageRow]]:
        dead = backend.ledger("dead", clock=fixed_clock(hour_ago))
        await dead.open()
        for row in dead_rows:
            await dead.start(row)
        await dead.checkpoint([replace(row, tokens=10 + n) for n, row in enumerate(dead_rows)])
        # the process dies here: no finish, no close (its connection just goes away)
        await dead._store.close()
        backend.backdate("dead")
        async with backend.ledger("live") as live, backend.ledger("me") as me:
            await live.start(live_row)
            await me.start(own_row)
            closed = await me.recover(dead_after=60)
            again = await me.recover(dead_after=60)
            stored = await me.query()
            await live.finish(replace(live_row, reason="complete", ended_at=T0))
            await me.finish(replace(own_row, reason="complete", ended_at=T0))
        return closed, again, stored

    closed, again, stored = run(scenario())
    assert (closed, again) == (3, 0)
    by_instance = {row.instance: row for row in stored if row.instance != "dead"}
    assert by_instance["live"].is_open and by_instance["me"].is_open
    crashed = [row for row in stored if row.instance == "dead"]
    assert [(row.tokens, row.reason) for row in crashed] == [
        (10, "crashed"),
        (11, "crashed"),
        (12, "crashed"),
    ]
    # ended when the figures were last stored: what was lost after that is visible
    assert {row.ended_at for row in crashed} == {hour_ago}


def test_recover_closes_instances_named_dead_and_never_its_own(backend: Backend) -> None:
    row = make_row("other")
    mine = make_row("me")

    async def scenario() -> tuple[int, int, list[UsageRow]]:
        async with backend.ledger("other") as other, backend.ledger("me") as me:
            await other.start(row)
            await me.start(mine)
            alive = await me.recover(dead_after=3600, dead=["me"])
            named = await me.recover(dead_after=3600, dead=["other"])
            return alive, named, await me.query()

    alive, named, stored = run(scenario())
    assert (alive, named) == (0, 1)
    assert [(row.instance, row.reason) for row in stored] == [("other", "crashed"), ("me", None)]


def test_rows_left_open_by_a_closed_instance_are_recovered(backend: Backend) -> None:
    row = make_row("quitter")

    async def scenario() -> tuple[int, int]:
        async with backend.ledger("quitter") as quitter:
            await quitter.start(row)
            report = await quitter.close()
        async with backend.ledger("me") as me:
            return report.left_open, await me.recover(dead_after=3600)

    assert run(scenario()) == (1, 1)


def test_reopening_the_same_instance_id_closes_what_its_last_life_left_open(
    backend: Backend,
) -> None:
    row = make_row("fixed-name")

    async def scenario() -> list[UsageRow]:
        first = backend.ledger("fixed-name")
        await first.open()
        await first.start(row)
        await first.checkpoint([replace(row, tokens=4)])
        await first._store.close()  # killed
        async with backend.ledger("fixed-name") as second:
            await second.start(replace(row, started_at=row.started_at + timedelta(seconds=1)))
            return await second.query()

    stored = run(scenario())
    assert [(row.tokens, row.reason) for row in stored] == [(4, "crashed"), (0, None)]


def test_kill_9_of_a_writer_then_a_new_process_recovers_its_rows(
    backend: Backend, tmp_path: Path
) -> None:
    child = textwrap.dedent(
        """
        import asyncio, sys
        from dataclasses import replace
        from datetime import UTC, datetime, timedelta
        from sserelay.ledger import UsageRow
        sys.path.insert(0, sys.argv[3])
        from tests.ledger.conftest import Backend

        async def main():
            ledger = Backend(sys.argv[1], sys.argv[2]).ledger("child")
            await ledger.open()
            start = datetime(2026, 11, 27, tzinfo=UTC)
            rows = [
                UsageRow(id=f"r{n}", instance="child", started_at=start + timedelta(seconds=n),
                         client="127.0.0.1:1", method="GET", path="/", tokenizer="whitespace")
                for n in range(3)
            ]
            for row in rows:
                await ledger.start(row)
            await ledger.checkpoint([replace(row, tokens=100 + n) for n, row in enumerate(rows)])
            print("ready", flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child, backend.name, backend.target, str(ROOT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=15), "the child did not get ready"
        assert process.stdout.readline() == b"ready\n", (
            process.stderr.read() if process.stderr else ""
        )
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=5) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()

    async def scenario() -> tuple[int, list[UsageRow]]:
        async with backend.ledger("restarted") as ledger:
            # dead_after=0: any heartbeat older than now is stale; a real relay gives a few
            # heartbeat periods
            closed = await ledger.recover(dead_after=0)
            return closed, await ledger.query()

    closed, stored = run(scenario())
    assert closed == 3
    assert [(row.id, row.tokens, row.reason) for row in stored] == [
        ("r0", 100, "crashed"),
        ("r1", 101, "crashed"),
        ("r2", 102, "crashed"),
    ]


def test_query_takes_a_half_open_range_and_spent_sums_a_key(backend: Backend) -> None:
    def ended(row: UsageRow) -> UsageRow:
        return replace(row, reason="complete", ended_at=row.started_at + timedelta(seconds=1))

    rows = [
        ended(make_row(started_at=T0 + timedelta(hours=h), key=key, tokens=t, cost=c))
        for h, key, t, c in [
            (0, "k1", 10, 0.5),
            (1, "k1", 20, None),
            (2, "k2", 40, 1.0),
            (3, None, 80, 2.0),
            (4, "k1", 160, 0.25),
        ]
    ]

    async def scenario() -> tuple[list[list[int]], list[tuple[int, float]]]:
        async with backend.ledger("a") as ledger:
            for row in rows:
                await ledger.finish(row)
            ranges = [
                await ledger.query(T0 + timedelta(hours=1), T0 + timedelta(hours=3)),
                await ledger.query(since=T0 + timedelta(hours=4)),
                await ledger.query(until=T0 + timedelta(hours=1)),
                await ledger.query(),
            ]
            spent = [
                await ledger.spent("k1"),
                await ledger.spent("k1", T0 + timedelta(minutes=30)),
                await ledger.spent(None),
                await ledger.spent("nobody"),
            ]
            return [[row.tokens for row in found] for found in ranges], spent

    ranges, spent = run(scenario())
    assert ranges == [[20, 40], [160], [10], [10, 20, 40, 80, 160]]
    assert spent == [(190, 0.75), (180, 0.25), (80, 2.0), (0, 0.0)]


def test_a_reader_reads_and_refuses_to_write(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.ledger("a") as ledger:
            await ledger.finish(full_row())
        async with backend.ledger(None) as reader:
            assert reader.instance is None
            assert len(await reader.query()) == 1
            with pytest.raises(LedgerError, match="read only"):
                await reader.start(make_row())
            with pytest.raises(LedgerError, match="read only"):
                await reader.heartbeat()

    run(scenario())


def test_misuse_is_refused_before_anything_is_written(backend: Backend) -> None:
    async def scenario() -> None:
        ledger: QueuedLedger = backend.ledger("a")
        with pytest.raises(LedgerError, match="not open"):
            await ledger.start(make_row())
        async with ledger:
            with pytest.raises(ValueError, match="instance"):
                await ledger.start(make_row("b"))
            with pytest.raises(ValueError, match="open row"):
                await ledger.start(full_row())
            with pytest.raises(ValueError, match="ended row"):
                await ledger.finish(make_row())
            assert await ledger.query() == []

    run(scenario())


def test_heartbeat_and_a_clean_close(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.ledger("a") as ledger:
            await ledger.heartbeat()
            row = make_row()
            await ledger.start(row)
            await ledger.finish(replace(row, reason="complete", ended_at=T0))
            report = await ledger.close()
            assert report.clean and report.fallback_path is None
            assert (await ledger.close()).clean  # twice is harmless
            with pytest.raises(LedgerError, match="not open"):
                await ledger.query()

    run(scenario())
    assert backend.warnings == []


def test_hostile_text_is_stored_as_replacement_characters_not_refused(backend: Backend) -> None:
    hostile = make_row(model="gpt\x00-4o", path="/v1/\udc80chat", key="k\x00", client="\x00:1")

    async def scenario() -> list[UsageRow]:
        async with backend.ledger("a") as ledger:
            await ledger.start(hostile)
            await ledger.finish(replace(hostile, reason="complete", ended_at=T0))
            return await ledger.query()

    (stored,) = run(scenario())
    assert (stored.model, stored.path, stored.key, stored.client) == (
        "gpt\ufffd-4o",
        "/v1/\ufffdchat",
        "k\ufffd",
        "\ufffd:1",
    )
    assert backend.warnings == []
