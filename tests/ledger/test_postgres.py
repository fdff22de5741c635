"""The PostgreSQL ledger's own concerns, against a real server: a server that refuses, one
lost mid-run and back, one still gone at close, schema versions, masked passwords."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sserelay.ledger import JSONLinesLedger, LedgerError, UsageRow, open_ledger
from sserelay.ledger import postgres as postgres_backend
from sserelay.ledger.postgres import PostgresLedger, mask_url
from tests.ledger.conftest import T0, make_row, run
from tests.services import PostgresServer, free_port


def pg_ledger(url: str, instance: str | None = "a", **options: Any) -> PostgresLedger:
    options.setdefault("timeout", 3.0)
    return PostgresLedger(url, instance=instance, **options)


def open_error(url: str) -> str:
    async def scenario() -> None:
        await pg_ledger(url).open()

    with pytest.raises(LedgerError) as caught:
        run(scenario())
    message = str(caught.value)
    assert "\n" not in message
    return message


def execute(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(sql.encode())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("postgres://u:p%40ss@db/x?sslmode=require", "postgres://u:***@db/x?sslmode=require"),
        (
            "postgresql://u@db/x?password=s3cret&sslmode=off",
            "postgresql://u@db/x?password=***&sslmode=off",
        ),
        ("postgresql://db/x", "postgresql://db/x"),
    ],
)
def test_display_masks_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert open_ledger(url, instance="a").display == shown


def test_a_server_that_refuses_is_one_line_without_the_password() -> None:
    url = f"postgresql://sserelay:s3cret-pw@127.0.0.1:{free_port()}/nothing"
    message = open_error(url)
    assert message.startswith(
        f"cannot open ledger postgresql://sserelay:***@127.0.0.1:{url.split(':')[3]}"
    )
    assert "Connection refused" in message and "s3cret-pw" not in message


def test_a_missing_database_is_one_line(postgres_server: PostgresServer) -> None:
    message = open_error(postgres_server.url("no_such_db"))
    assert 'database "no_such_db" does not exist' in message


def test_schema_versions_newer_or_foreign_are_refused(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async def create() -> None:
        async with pg_ledger(postgres_url):
            pass

    run(create())
    execute(postgres_url, "UPDATE sserelay.meta SET value = '7' WHERE key = 'schema_version'")
    assert "has schema version 7, newer than this sserelay knows (1)" in open_error(postgres_url)
    other = postgres_server.create_database("foreign_tables")
    execute(other, "CREATE SCHEMA sserelay; CREATE TABLE sserelay.things (x int)")
    assert "schema sserelay holds tables but no sserelay ledger" in open_error(other)


def test_a_migration_step_runs_once_and_keeps_the_rows(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = replace(make_row(), reason="complete", ended_at=T0)

    async def write() -> None:
        async with pg_ledger(postgres_url) as ledger:
            await ledger.finish(row)

    async def read() -> list[UsageRow]:
        async with pg_ledger(postgres_url, None) as reader:
            return await reader.query()

    run(write())
    step = ("ALTER TABLE sserelay.usage ADD COLUMN note text DEFAULT 'migrated'",)
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", [*postgres_backend.MIGRATIONS, step])
    assert run(read()) == [row]
    assert run(read()) == [row]  # no second ALTER (it would fail)


def test_instances_opening_a_new_database_at_once_migrate_it_once(postgres_url: str) -> None:
    async def scenario() -> None:
        ledgers = [pg_ledger(postgres_url, f"i{n}") for n in range(4)]
        await asyncio.gather(*(ledger.open() for ledger in ledgers))
        for ledger in ledgers:
            await ledger.close()

    run(scenario())


async def wait_for(condition: Any, what: str, deadline: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while not condition():
        if loop.time() > until:
            raise AssertionError(f"not {what} within {deadline} s")
        await asyncio.sleep(0.02)


def test_a_server_lost_mid_run_queues_rows_warns_once_and_writes_them_when_back(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    warnings: list[str] = []
    rows = [make_row() for _ in range(6)]

    async def scenario() -> tuple[int, list[UsageRow]]:
        async with pg_ledger(postgres_url, on_warning=warnings.append, retry=(0.02, 0.2)) as ledger:
            await ledger.start(rows[0])
            postgres_server.crash()
            try:
                for row in rows[1:]:
                    await ledger.start(row)  # returns: queued, not raised
                await ledger.checkpoint([replace(row, tokens=5) for row in rows])
                await ledger.finish(replace(rows[0], tokens=6, reason="complete", ended_at=T0))
                await ledger.heartbeat()
                queued = ledger.queued
                assert not ledger.available
                with pytest.raises(LedgerError, match="unavailable"):
                    await ledger.query()
            finally:
                postgres_server.start()
            await wait_for(lambda: ledger.available and not ledger.queued, "written")
            stored = await ledger.query()
            for row in rows[1:]:
                await ledger.finish(replace(row, reason="interrupted", ended_at=T0))
            return queued, stored

    queued, stored = run(scenario(), deadline=20)
    assert queued == 6
    assert [(row.tokens, row.reason) for row in stored] == [(6, "complete")] + [(5, None)] * 5
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"ledger {postgres_url} unavailable: ")
    assert warnings[0].endswith("; keeping rows in memory and retrying")
    assert warnings[1] == f"ledger {postgres_url} is back: 6 rows written"


def test_still_down_at_close_the_rows_go_to_a_json_lines_fallback(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    warnings: list[str] = []
    rows = [replace(make_row(), tokens=n, reason="complete", ended_at=T0) for n in range(4)]

    async def scenario() -> tuple[int, Path | None]:
        ledger = pg_ledger(
            postgres_url, on_warning=warnings.append, retry=(5.0, 5.0), fallback_dir=tmp_path
        )
        await ledger.open()
        postgres_server.crash()
        try:
            for row in rows:
                await ledger.finish(row)
            report = await ledger.close()
        finally:
            postgres_server.start()
        return report.unwritten, report.fallback_path

    unwritten, fallback = run(scenario(), deadline=20)
    assert unwritten == 4 and fallback is not None and fallback.parent == tmp_path
    assert len(warnings) == 1

    async def read_back() -> list[UsageRow]:
        async with JSONLinesLedger(fallback, instance=None) as reader:
            return await reader.query()

    assert run(read_back()) == rows
