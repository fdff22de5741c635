"""The SQLite ledger's own concerns: WAL, the worker thread, files that are not ledgers,
migrations, and a full disk mid-run."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from sserelay.ledger import JSONLinesLedger, LedgerError, SQLiteLedger, UsageRow
from sserelay.ledger import sqlite as sqlite_backend
from sserelay.ledger.schema import SCHEMA_VERSION
from tests.ledger.conftest import T0, make_row, run


def opened(path: Path, instance: str | None = "a", **options: object) -> SQLiteLedger:
    return SQLiteLedger(path, instance=instance, **options)  # type: ignore[arg-type]


def open_error(path: Path, instance: str | None = "a") -> str:
    async def scenario() -> None:
        await opened(path, instance).open()

    with pytest.raises(LedgerError) as caught:
        run(scenario())
    message = str(caught.value)
    assert "\n" not in message
    return message


def schema_version(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        (value,) = connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
    connection.close()
    return int(value)


def test_the_file_is_in_wal_mode_and_the_parents_are_made(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sserelay" / "usage.db"

    async def scenario() -> str:
        async with opened(path) as ledger:
            return ledger.journal_mode

    assert run(scenario()) == "wal"
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.close()
    assert schema_version(path) == SCHEMA_VERSION == len(sqlite_backend.MIGRATIONS)


def test_an_empty_file_is_a_version_0_ledger_and_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    path.write_bytes(b"")

    async def scenario() -> None:
        async with opened(path) as ledger:
            await ledger.finish(replace(make_row(), reason="complete", ended_at=T0))

    run(scenario())
    assert schema_version(path) == 1


def test_a_migration_step_runs_once_and_keeps_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "usage.db"
    row = replace(make_row(), reason="complete", ended_at=T0)

    async def write_v1() -> None:
        async with opened(path) as ledger:
            await ledger.finish(row)

    run(write_v1())
    assert schema_version(path) == 1
    step = ("ALTER TABLE usage ADD COLUMN note TEXT", "UPDATE usage SET note = 'migrated'")
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [*sqlite_backend.MIGRATIONS, step])

    async def read_v2() -> list[UsageRow]:
        async with opened(path, None) as reader:
            return await reader.query()

    assert run(read_v2()) == [row]
    assert schema_version(path) == 2
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT note FROM usage").fetchall() == [("migrated",)]
    connection.close()
    run(read_v2())  # a second open runs no step again (ALTER TABLE would fail)
    monkeypatch.undo()
    message = open_error(path)
    assert "schema version 2, newer than this sserelay knows (1); upgrade sserelay" in message


def test_a_corrupt_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    path.write_bytes(b"this is not an SQLite database, just text\n" * 100)
    assert "file is not a database" in open_error(path)


def test_another_programs_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE customers (name TEXT)")
    connection.close()
    assert "not an sserelay ledger (tables: customers)" in open_error(path)


def test_an_unwritable_path_is_refused_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # a file where a directory should be: refused even for root, unlike a chmod
    assert open_error(blocker / "db" / "usage.db") == (
        f"cannot open ledger {blocker}/db/usage.db: Not a directory: {blocker}"
    )
    assert open_error(tmp_path) == f"cannot open ledger {tmp_path}: it is a directory"


def test_a_reader_does_not_create_a_missing_ledger(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    assert open_error(path, None) == f"cannot open ledger {path}: no ledger there"
    assert not path.exists()


def test_a_write_waiting_on_another_process_never_blocks_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"

    async def scenario() -> int:
        async with opened(path) as ledger:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                write = asyncio.create_task(ledger.start(make_row()))
                ticks = 0
                while ticks < 200:  # the loop keeps turning while the write waits
                    await asyncio.sleep(0)
                    ticks += 1
                assert not write.done()
            finally:
                other.execute("COMMIT")
                other.close()
            await write
            return len(await ledger.query())

    assert run(scenario()) == 1


async def fill_the_disk(ledger: SQLiteLedger) -> None:
    """From now on, SQLite answers SQLITE_FULL ("database or disk is full") to any write
    that needs a new page, as it does on a full disk."""

    def cap(connection: sqlite3.Connection) -> None:
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        connection.execute(f"PRAGMA max_page_count = {pages}")

    await ledger.store._guarded(cap)


async def free_the_disk(ledger: SQLiteLedger) -> None:
    await ledger.store._guarded(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))


def big_row() -> UsageRow:
    return make_row(path="/" + "x" * 5000)  # more than a page: the cap bites at once


def test_a_full_disk_mid_run_queues_rows_warns_once_and_writes_them_when_space_returns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.db"
    warnings: list[str] = []
    rows = [big_row() for _ in range(20)]

    async def scenario() -> tuple[int, bool, list[UsageRow]]:
        async with opened(path, on_warning=warnings.append, retry=(0.01, 0.05)) as ledger:
            await ledger.start(rows[0])
            await fill_the_disk(ledger)
            for row in rows[1:]:
                await ledger.start(row)  # returns: queued, not raised
            queued, available = ledger.queued, ledger.available
            await ledger.checkpoint([replace(row, tokens=1) for row in rows])
            await ledger.heartbeat()  # skipped while lost: no second warning
            await free_the_disk(ledger)
            while not ledger.available or ledger.queued:  # the retry task writes them
                await asyncio.sleep(0.01)
            return queued, available, await ledger.query()

    queued, available, stored = run(scenario())
    assert queued == 19 and not available
    assert [row.tokens for row in stored] == [1] * 20
    assert len(warnings) == 2, warnings
    assert "unavailable: database or disk is full; keeping rows in memory" in warnings[0]
    assert warnings[1] == f"ledger {path} is back: 20 rows written"


def test_still_full_at_close_the_rows_go_to_a_json_lines_fallback(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    rows = [replace(big_row(), reason="complete", ended_at=T0, tokens=n) for n in range(5)]
    still_open = big_row()

    async def scenario() -> tuple[int, Path | None, int]:
        ledger = opened(path, on_warning=lambda _: None, retry=(10.0, 10.0))
        await ledger.open()
        await fill_the_disk(ledger)
        await ledger.start(still_open)
        for row in rows:
            await ledger.finish(row)
        report = await ledger.close()
        return report.unwritten, report.fallback_path, report.left_open

    unwritten, fallback, left_open = run(scenario())
    assert (unwritten, left_open) == (6, 1)
    assert fallback is not None and fallback.parent == tmp_path
    assert fallback.name.startswith("sserelay-unwritten-a-") and fallback.suffix == ".jsonl"

    async def read_back() -> list[UsageRow]:
        async with JSONLinesLedger(fallback, instance=None) as reader:
            return await reader.query()

    assert run(read_back()) == sorted([*rows, still_open], key=lambda row: row.started_at)


def test_past_the_queue_bound_finished_rows_are_spilled_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    warnings: list[str] = []
    rows = [replace(big_row(), reason="complete", ended_at=T0) for _ in range(12)]

    async def scenario() -> tuple[int, int, Path | None]:
        ledger = opened(path, on_warning=warnings.append, max_queued=4, retry=(10.0, 10.0))
        await ledger.open()
        await fill_the_disk(ledger)
        for row in rows:
            await ledger.finish(row)
        queued = ledger.queued
        report = await ledger.close()
        return queued, report.unwritten, report.fallback_path

    queued, unwritten, fallback = run(scenario())
    assert queued <= 4
    assert unwritten == 12 and fallback is not None
    assert [message for message in warnings if "more than 4 rows waiting" in message] == [
        f"ledger {path}: more than 4 rows waiting; finished rows are going to {fallback}"
    ]

    async def read_back() -> list[UsageRow]:
        async with JSONLinesLedger(fallback, instance=None) as reader:
            return await reader.query()

    assert run(read_back()) == rows


def test_when_no_fallback_file_can_be_written_the_report_says_the_rows_are_lost(
    tmp_path: Path,
) -> None:
    rows = [replace(big_row(), reason="complete", ended_at=T0) for _ in range(3)]

    def no_space(data: bytes) -> Path:
        raise OSError(28, "No space left on device", str(tmp_path))

    async def scenario() -> tuple[int, Path | None, str | None]:
        ledger = opened(tmp_path / "usage.db", on_warning=lambda _: None, retry=(10.0, 10.0))
        ledger._append_fallback = no_space  # type: ignore[method-assign]
        await ledger.open()
        await fill_the_disk(ledger)
        for row in rows:
            await ledger.finish(row)
        report = await ledger.close()
        return report.unwritten, report.fallback_path, report.error

    assert run(scenario()) == (
        3,
        None,
        f"cannot write a fallback file: No space left on device: {tmp_path}",
    )


def test_concurrent_finishes_past_the_bound_spill_each_row_once(tmp_path: Path) -> None:
    rows = [replace(big_row(), reason="complete", ended_at=T0) for _ in range(30)]

    async def scenario() -> tuple[int, Path | None]:
        ledger = opened(tmp_path / "usage.db", on_warning=lambda _: None, max_queued=3)
        await ledger.open()
        await fill_the_disk(ledger)
        await ledger.finish(rows[0])  # the store is lost from here on
        await asyncio.gather(*(ledger.finish(row) for row in rows[1:]))
        report = await ledger.close()
        return report.unwritten, report.fallback_path

    unwritten, fallback = run(scenario())
    assert unwritten == 30 and fallback is not None
    assert len(fallback.read_text().splitlines()) == 1 + 30  # the meta line and each row once
