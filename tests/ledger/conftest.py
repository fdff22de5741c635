"""Fixtures for the ledger tests: every backend behind one `Backend`, a real PostgreSQL.

def test_x(backend: Backend) -> None:          # runs for sqlite, jsonl and postgres
    async def scenario() -> None:
        async with backend.ledger("a") as ledger: ...
    run(scenario())
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sserelay.ledger import JSONLinesLedger, QueuedLedger, SQLiteLedger, UsageRow
from tests.services import PostgresServer

T = TypeVar("T")

#: A fixed instant the rows start at (each row a microsecond later than the last).
T0 = datetime(2026, 11, 27, 18, 54, 33, 123456, tzinfo=UTC)
BACKENDS = ("sqlite", "jsonl", "postgres")


def run(coro: Awaitable[T], deadline: float = 10.0) -> T:
    """Run `coro` on a fresh loop; one that stalls fails after `deadline` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, deadline)

    return asyncio.run(bounded())


_serial = itertools.count()


def make_row(instance: str = "a", **changes: Any) -> UsageRow:
    """An open row of `instance` with a fresh id, started at T0 + a few microseconds."""
    serial = next(_serial)
    values: dict[str, Any] = {
        "id": f"req_{serial:024x}",
        "instance": instance,
        "started_at": T0 + timedelta(microseconds=serial),
        "client": "127.0.0.1:50000",
        "method": "GET",
        "path": "/",
        "tokenizer": "whitespace",
    }
    values.update(changes)
    return UsageRow(**values)


def fixed_clock(moment: datetime) -> Callable[[], datetime]:
    return lambda: moment


@dataclass
class Backend:
    """One backend under test: where its ledger lives and how to make ledgers on it."""

    name: str
    target: str
    server: PostgresServer | None = None
    warnings: list[str] = field(default_factory=list)

    def ledger(self, instance: str | None, **options: Any) -> QueuedLedger:
        """A ledger on this backend (not opened); its warnings land in `self.warnings`."""
        options.setdefault("on_warning", self.warnings.append)
        if self.name == "sqlite":
            return SQLiteLedger(Path(self.target), instance=instance, **options)
        if self.name == "jsonl":
            return JSONLinesLedger(Path(self.target), instance=instance, **options)
        from sserelay.ledger.postgres import PostgresLedger

        options.setdefault("timeout", 3.0)
        return PostgresLedger(self.target, instance=instance, **options)

    def backdate(self, instance: str) -> None:
        """Make `instance`'s heartbeat an hour old (PostgreSQL takes heartbeats from its
        own clock; the file backends take them from the ledger's clock, given as a past
        one by the test)."""
        if self.name == "postgres":
            import psycopg

            with psycopg.connect(self.target, autocommit=True) as pg:
                pg.execute(
                    "UPDATE sserelay.instances SET heartbeat_at = now() - interval '1 hour' "
                    "WHERE instance = %s",
                    (instance,),
                )
        elif self.name == "sqlite":
            with sqlite3.connect(self.target) as connection:
                connection.execute(
                    "UPDATE instances SET heartbeat_at = '2000-01-01T00:00:00.000000Z' "
                    "WHERE instance = ?",
                    (instance,),
                )
            connection.close()


@pytest.fixture(autouse=True)
def private_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ledger test writes to the real ~/.local/state (a fallback file would go there)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def postgres_database(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database("ledger")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, postgres_database: str) -> str:
    """The session's database, emptied of any ledger (dropping the schema is ten times
    quicker than making a database per test)."""
    import psycopg

    if not postgres_server.service or not postgres_server.service.running:
        postgres_server.start()  # a test that crashed it and failed before restarting
    with psycopg.connect(postgres_database, autocommit=True) as pg:
        pg.execute("SET lock_timeout = '5s'")
        pg.execute("DROP SCHEMA IF EXISTS sserelay CASCADE")
    return postgres_database


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return Backend(name, url, request.getfixturevalue("postgres_server"))
    return Backend(name, str(tmp_path / ("usage.db" if name == "sqlite" else "usage.jsonl")))
