"""The PostgreSQL ledger (a `postgresql://` or `postgres://` URL): psycopg 3, async.

Needs the optional extra `sserelay[postgres]` (`psycopg[binary]`, which brings its own
libpq; plain `psycopg` over Debian's libpq5 works as well). The tables live in the schema
`sserelay` of the database the URL names, so they never clash with an application's own.
Each batch of writes is one transaction of `INSERT ... ON CONFLICT` upserts (sent as one
pipeline). Heartbeats and the staleness of a heartbeat use the server's clock, so instances
on hosts whose clocks disagree still judge each other alive or dead alike.

A server lost mid-run is the queue's business (`queued.py`): this store turns every database
error or timeout into StoreUnavailable, drops the connection, and connects anew next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import socket
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import LedgerError
from .queued import QueuedLedger, QueueOptions
from .row import UsageRow
from .schema import (
    USAGE_COLUMNS,
    is_dead,
    migration_steps,
    row_values,
    select_sql,
    spent_sql,
    upsert_sql,
)
from .store import StoreUnavailable, Write

try:
    import psycopg
except ImportError:  # the optional extra is not installed
    psycopg = None  # type: ignore[assignment]

SCHEMA = "sserelay"
#: Serialises migrations between instances that open one database at the same moment.
_MIGRATION_LOCK = 0x55E_2E1A7

#: How long one connect or one transaction may take before the server counts as lost.
TIMEOUT_S = 10.0

MIGRATIONS: list[tuple[str, ...]] = [
    (
        f"CREATE TABLE {SCHEMA}.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE {SCHEMA}.usage (
            id text NOT NULL,
            instance text NOT NULL,
            started_at timestamptz NOT NULL,
            first_token_at timestamptz,
            ended_at timestamptz,
            client text NOT NULL,
            key text,
            method text NOT NULL,
            path text NOT NULL,
            model text,
            status integer,
            reason text,
            tokens bigint NOT NULL,
            events bigint NOT NULL,
            bytes bigint NOT NULL,
            tokenizer text NOT NULL,
            input_tokens bigint,
            output_tokens bigint,
            cached_tokens bigint,
            usage_source text NOT NULL,
            cost double precision,
            last_event_id text,
            updated_at timestamptz NOT NULL,
            PRIMARY KEY (instance, id, started_at)
        )""",
        f"CREATE INDEX usage_started_at ON {SCHEMA}.usage (started_at)",
        f"CREATE INDEX usage_key_started_at ON {SCHEMA}.usage (key, started_at)",
        f"CREATE INDEX usage_open ON {SCHEMA}.usage (instance) WHERE ended_at IS NULL",
        f"""CREATE TABLE {SCHEMA}.instances (
            instance text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            ended_at timestamptz,
            state text NOT NULL
        )""",
    ),
]

_USAGE = f"{SCHEMA}.usage"
_UPSERT_OPEN = upsert_sql(_USAGE, "%s", ends=False)
_UPSERT_FINISH = upsert_sql(_USAGE, "%s", ends=True)
_REGISTER = (
    f"INSERT INTO {SCHEMA}.instances "
    "(instance, host, pid, started_at, heartbeat_at, ended_at, state) "
    "VALUES (%s, %s, %s, %s, now(), NULL, 'live') ON CONFLICT (instance) DO UPDATE SET "
    "host = excluded.host, pid = excluded.pid, started_at = excluded.started_at, "
    "heartbeat_at = now(), ended_at = NULL, state = 'live'"
)
_HEARTBEAT = (
    f"INSERT INTO {SCHEMA}.instances "
    "(instance, host, pid, started_at, heartbeat_at, ended_at, state) "
    "VALUES (%s, %s, %s, %s, now(), NULL, 'live') ON CONFLICT (instance) DO UPDATE SET "
    "heartbeat_at = now(), ended_at = NULL, state = 'live'"
)
_CLOSE_OPEN_ROWS = (
    f"UPDATE {_USAGE} SET reason = 'crashed', ended_at = updated_at "
    "WHERE instance = %s AND ended_at IS NULL"
)
_MARK_CRASHED = (
    f"UPDATE {SCHEMA}.instances SET state = 'crashed', ended_at = heartbeat_at "
    "WHERE instance = %s AND state = 'live'"
)


def mask_url(url: str) -> str:
    """`url` with its password (in the authority or a `password=` parameter) as `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in pairs):
            query = urlencode(
                [(name, "***" if name == "password" else value) for name, value in pairs],
                safe="*",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [value for name, value in parse_qsl(parts.query) if name == "password" and value]
    return found


_row_values = operator.attrgetter(*USAGE_COLUMNS[:-1])


def _params(write: Write) -> tuple[object, ...]:
    return (*_row_values(write.row), write.at)


class PostgresStore:
    """The `Store` over one PostgreSQL database, through one async connection."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S) -> None:
        if psycopg is None:
            raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'sserelay[postgres]'")
        self._url = url
        self._display = mask_url(url)
        self._secrets = _secrets_of(url)
        self._timeout = timeout
        self._connection: psycopg.AsyncConnection[Any] | None = None
        self._connected_before = False

    @property
    def display(self) -> str:
        return self._display

    @property
    def fallback_dir(self) -> Path | None:
        return None

    def _say(self, exc: BaseException) -> str:
        """One line about `exc`, with every secret of the URL masked (libpq may quote it)."""
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout:g} s"
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        self._connection = None
        async with asyncio.timeout(self._timeout):
            connection = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(2, round(self._timeout)),
                application_name="sserelay",
                options="-c TimeZone=UTC",
            )
        self._connection = connection  # from here on, a failure's _drop() closes it
        if self._connected_before:
            # a server back from a crash or a restore may have lost the tables: make sure
            # of them again, so the queued rows have somewhere to go
            async with asyncio.timeout(self._timeout):
                await self._migrate(connection)
        self._connected_before = True
        return connection

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await connection.close()

    async def _transaction(self, statements: Sequence[tuple[str, Any]], many: bool = False) -> None:
        """Run (sql, params) pairs in ONE transaction; `many`: params are sequences of rows."""
        try:
            connection = await self._connect()
            async with asyncio.timeout(self._timeout):
                async with connection.transaction(), connection.cursor() as cursor:
                    for sql, params in statements:
                        if many:
                            await cursor.executemany(sql, params)
                        else:
                            await cursor.execute(sql, params)
        except (psycopg.Error, OSError, TimeoutError, ValueError) as exc:
            await self._drop()
            raise StoreUnavailable(self._say(exc)) from exc

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            connection = await self._connect()
            async with asyncio.timeout(self._timeout), connection.cursor() as cursor:
                await cursor.execute(sql, params)
                return await cursor.fetchall()
        except (psycopg.Error, OSError, TimeoutError, ValueError) as exc:
            await self._drop()
            raise StoreUnavailable(self._say(exc)) from exc

    # ------------------------------------------------------------------ open

    async def open(self, instance: str | None, at: datetime) -> None:
        where = f"cannot open ledger {self._display}"
        try:
            connection = await self._connect()
            async with asyncio.timeout(self._timeout):
                await self._migrate(connection)
                if instance is not None:
                    async with connection.transaction():
                        await connection.execute(
                            _REGISTER, (instance, socket.gethostname(), os.getpid(), at)
                        )
                        await connection.execute(_CLOSE_OPEN_ROWS, (instance,))
        except (psycopg.Error, OSError, TimeoutError, ValueError) as exc:
            await self._drop()
            raise LedgerError(f"{where}: {self._say(exc)}") from exc
        except BaseException:
            await self._drop()
            raise

    async def _migrate(self, connection: psycopg.AsyncConnection[Any]) -> None:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cursor = await connection.execute(
                "SELECT to_regnamespace(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL, "
                "(SELECT count(*) FROM pg_tables WHERE schemaname = %s)",
                (SCHEMA, f"{SCHEMA}.meta", SCHEMA),
            )
            found_row = await cursor.fetchone()
            assert found_row is not None
            has_schema, has_meta, tables = found_row
            if has_meta:
                cursor = await connection.execute(
                    f"SELECT value FROM {SCHEMA}.meta WHERE key = 'schema_version'"
                )
                version = await cursor.fetchone()
                if version is None or not str(version[0]).isdigit():
                    raise LedgerError(f"{self._display} has no readable schema_version")
                found = int(version[0])
            elif tables:
                raise LedgerError(
                    f"{self._display}: schema {SCHEMA} holds tables but no sserelay ledger"
                )
            else:
                found = 0
                if not has_schema:
                    await connection.execute(f"CREATE SCHEMA {SCHEMA}")
            for step in migration_steps(found, self._display, MIGRATIONS):
                for statement in MIGRATIONS[step]:
                    await connection.execute(statement)
                await connection.execute(
                    f"INSERT INTO {SCHEMA}.meta (key, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(step + 1),),
                )

    # ------------------------------------------------------------------ writes

    async def write(self, batch: Sequence[Write]) -> None:
        opens = [_params(write) for write in batch if not write.ends]
        finishes = [_params(write) for write in batch if write.ends]
        statements = [
            (sql, rows) for sql, rows in ((_UPSERT_OPEN, opens), (_UPSERT_FINISH, finishes)) if rows
        ]
        await self._transaction(statements, many=True)

    async def ping(self) -> None:
        await self._fetch("SELECT 1", ())

    async def heartbeat(self, instance: str, at: datetime) -> None:
        await self._transaction([(_HEARTBEAT, (instance, socket.gethostname(), os.getpid(), at))])

    async def end_instance(self, instance: str, at: datetime) -> None:
        await self._transaction(
            [
                (
                    f"UPDATE {SCHEMA}.instances SET state = 'closed', ended_at = %s "
                    "WHERE instance = %s",
                    (at, instance),
                )
            ]
        )

    async def recover(
        self, instance: str, dead_after: float, dead: Collection[str], at: datetime
    ) -> int:
        try:
            connection = await self._connect()
            async with asyncio.timeout(self._timeout), connection.transaction():
                # a second recoverer at the same moment waits on the first one's row locks,
                # then finds the rows ended (ended_at IS NULL no longer holds): no double count
                cursor = await connection.execute(
                    "SELECT u.instance, i.state, "
                    "i.heartbeat_at < now() - make_interval(secs => %s) FROM "
                    f"(SELECT DISTINCT instance FROM {_USAGE} WHERE ended_at IS NULL) AS u "
                    f"LEFT JOIN {SCHEMA}.instances AS i ON i.instance = u.instance",
                    (dead_after,),
                )
                closed = 0
                for name, state, stale in await cursor.fetchall():
                    if is_dead(name, state, stale, instance, dead):
                        done = await connection.execute(_CLOSE_OPEN_ROWS, (name,))
                        closed += done.rowcount
                        await connection.execute(_MARK_CRASHED, (name,))
                for name in set(dead) - {instance}:
                    await connection.execute(_MARK_CRASHED, (name,))
                return closed
        except (psycopg.Error, OSError, TimeoutError, ValueError) as exc:
            await self._drop()
            raise StoreUnavailable(self._say(exc)) from exc

    # ------------------------------------------------------------------ reads

    async def query(self, since: datetime | None, until: datetime | None) -> list[UsageRow]:
        sql = select_sql(_USAGE, "%s", since=since is not None, until=until is not None)
        params = [moment for moment in (since, until) if moment is not None]
        return [UsageRow(**row_values(values)) for values in await self._fetch(sql, params)]

    async def spent(self, key: str | None, since: datetime | None) -> tuple[int, float]:
        sql = spent_sql(_USAGE, "%s", keyed=key is not None, since=since is not None)
        params: list[object] = [] if key is None else [key]
        if since is not None:
            params.append(since.astimezone(UTC))
        ((tokens, cost),) = await self._fetch(sql, params)
        return int(tokens), float(cost)

    async def close(self) -> None:
        await self._drop()


class PostgresLedger(QueuedLedger):
    """A ledger in a PostgreSQL database (see the module docstring). Raises LedgerError
    from `open()` when the server refuses (down, bad password, no such database), with the
    password masked; from the constructor when psycopg is not installed."""

    def __init__(
        self,
        url: str,
        *,
        instance: str | None,
        timeout: float = TIMEOUT_S,
        **options: Unpack[QueueOptions],
    ) -> None:
        super().__init__(
            PostgresStore(url, timeout=timeout),
            instance=instance,
            **options,
        )
