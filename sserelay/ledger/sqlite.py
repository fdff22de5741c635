"""The SQLite ledger (the default): stdlib `sqlite3` in WAL mode, off the event loop.

Every call runs in ONE dedicated worker thread that owns the connection (a single-thread
executor), so the event loop never waits on the disk and the connection is never shared
between threads. Several processes may share the file: WAL lets readers run beside the one
writer, and the busy timeout makes a writer wait its turn instead of failing.

`synchronous=NORMAL`: in WAL mode a commit survives a process crash (`kill -9`) and can be
lost only to a power cut or OS crash, at most the last few transactions; the file is never
corrupted by it. That is the trade a ledger checkpointed every second can take.
"""

from __future__ import annotations

import contextlib
import operator
import os
import socket
import sqlite3
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar, Unpack
from urllib.parse import quote

from .errors import LedgerError, one_line
from .queued import QueuedLedger, QueueOptions
from .row import TIMESTAMP_COLUMNS, UsageRow, format_timestamp, parse_timestamp
from .schema import (
    USAGE_COLUMNS,
    is_dead,
    migration_steps,
    row_values,
    select_sql,
    spent_sql,
    upsert_sql,
)
from .store import FileStore, StoreUnavailable, Write, make_parents

T = TypeVar("T")

#: How long a writer waits for another process's transaction before it counts as a failure.
BUSY_TIMEOUT_S = 5.0

#: MIGRATIONS[v] takes the tables from version v to v + 1. Version 0 is an empty file.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE usage (
            id TEXT NOT NULL,
            instance TEXT NOT NULL,
            started_at TEXT NOT NULL,
            first_token_at TEXT,
            ended_at TEXT,
            client TEXT NOT NULL,
            key TEXT,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            model TEXT,
            status INTEGER,
            reason TEXT,
            tokens INTEGER NOT NULL,
            events INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            tokenizer TEXT NOT NULL,
            input_tokens INTEGER,
            output_tokens INTEGER,
            cached_tokens INTEGER,
            usage_source TEXT NOT NULL,
            cost REAL,
            last_event_id TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (instance, id, started_at)
        )""",
        "CREATE INDEX usage_started_at ON usage (started_at)",
        "CREATE INDEX usage_key_started_at ON usage (key, started_at)",
        "CREATE INDEX usage_open ON usage (instance) WHERE ended_at IS NULL",
        """CREATE TABLE instances (
            instance TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at TEXT NOT NULL,
            heartbeat_at TEXT NOT NULL,
            ended_at TEXT,
            state TEXT NOT NULL
        )""",
    ),
]

_UPSERT_OPEN = upsert_sql("usage", "?", ends=False)
_UPSERT_FINISH = upsert_sql("usage", "?", ends=True)
_REGISTER = (
    "INSERT INTO instances (instance, host, pid, started_at, heartbeat_at, ended_at, state) "
    "VALUES (?, ?, ?, ?, ?, NULL, 'live') ON CONFLICT (instance) DO UPDATE SET "
    "host = excluded.host, pid = excluded.pid, started_at = excluded.started_at, "
    "heartbeat_at = excluded.heartbeat_at, ended_at = NULL, state = 'live'"
)
_HEARTBEAT = (
    "INSERT INTO instances (instance, host, pid, started_at, heartbeat_at, ended_at, state) "
    "VALUES (?, ?, ?, ?, ?, NULL, 'live') ON CONFLICT (instance) DO UPDATE SET "
    "heartbeat_at = excluded.heartbeat_at, ended_at = NULL, state = 'live'"
)
_CLOSE_OPEN_ROWS = (
    "UPDATE usage SET reason = 'crashed', ended_at = updated_at "
    "WHERE instance = ? AND ended_at IS NULL"
)


_row_values = operator.attrgetter(*USAGE_COLUMNS[:-1])
_TIMESTAMP_POSITIONS = [USAGE_COLUMNS.index(column) for column in TIMESTAMP_COLUMNS]


def _params(write: Write) -> list[object]:
    """The row's values in column order, timestamps as text (this runs for every row of
    every checkpoint: one attrgetter call, not a getattr per column)."""
    values: list[object] = [*_row_values(write.row), format_timestamp(write.at)]
    for position in _TIMESTAMP_POSITIONS:
        moment = values[position]
        if moment is not None:
            values[position] = format_timestamp(moment)  # type: ignore[arg-type]
    return values


def _row(values: Sequence[object]) -> UsageRow:
    named = row_values(values)
    for column in TIMESTAMP_COLUMNS:
        text = named[column]
        named[column] = None if text is None else parse_timestamp(str(text))
    return UsageRow(**named)


class SQLiteStore(FileStore):
    """The `Store` over one SQLite file; every method hops to the worker thread."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        super().__init__(path)
        self._busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self.journal_mode = ""

    async def _guarded(self, call: Callable[[sqlite3.Connection], T]) -> T:
        """Run `call` with the connection in the worker; a database error (disk full, I/O
        error, locked past the busy timeout, a page gone bad) becomes StoreUnavailable."""

        def work() -> T:
            connection = self._connection
            if connection is None:
                raise StoreUnavailable("the ledger is closed")
            try:
                return call(connection)
            # ValueError, OverflowError: a value sqlite3 cannot bind; rows are validated
            # so that none reaches here, but one that did must not escape the queue's care
            except (sqlite3.Error, ValueError, OverflowError) as exc:
                if connection.in_transaction:
                    try:
                        connection.rollback()
                    except sqlite3.Error:
                        pass  # the error above is the one worth reporting
                raise StoreUnavailable(one_line(exc)) from exc

        return await self._run(work)

    # ------------------------------------------------------------------ open

    def _open(self, instance: str | None, at: datetime) -> None:
        where = f"cannot open ledger {self._path}"
        if self._path.is_dir():
            raise LedgerError(f"{where}: it is a directory")
        try:
            if instance is not None:
                make_parents(self._path)
                connection = sqlite3.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None
                )
            else:
                # a reader must not create an empty ledger where there is none
                if not self._path.exists():
                    raise LedgerError(f"{where}: no ledger there")
                uri = f"file:{quote(str(self._path.resolve()))}?mode=rw"
                connection = sqlite3.connect(
                    uri, uri=True, timeout=self._busy_timeout, isolation_level=None
                )
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"{where}: {one_line(exc)}") from exc
        self._connection = connection
        try:
            row = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            self.journal_mode = str(row[0]) if row else ""
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
            self._migrate(connection)
            if instance is not None:
                connection.execute("BEGIN IMMEDIATE")
                stamp = format_timestamp(at)
                connection.execute(
                    _REGISTER, (instance, socket.gethostname(), os.getpid(), stamp, stamp)
                )
                connection.execute(_CLOSE_OPEN_ROWS, (instance,))
                connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise LedgerError(f"{where}: {one_line(exc)}") from exc

    def _migrate(self, connection: sqlite3.Connection) -> None:
        # IMMEDIATE: two processes opening a new file at once must not both create it
        connection.execute("BEGIN IMMEDIATE")
        try:
            tables = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
            if "meta" in tables:
                found_row = connection.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'"
                ).fetchone()
                if found_row is None or not str(found_row[0]).isdigit():
                    raise LedgerError(f"{self._path} has no readable schema_version")
                found = int(found_row[0])
            elif tables:
                raise LedgerError(
                    f"{self._path} is an SQLite file but not an sserelay ledger "
                    f"(tables: {', '.join(sorted(tables))})"
                )
            else:
                found = 0
            for step in migration_steps(found, str(self._path), MIGRATIONS):
                for statement in MIGRATIONS[step]:
                    connection.execute(statement)
                connection.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(step + 1),),
                )
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):  # the error being raised is the news
                connection.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writes

    async def write(self, batch: Sequence[Write]) -> None:
        opens = [_params(write) for write in batch if not write.ends]
        finishes = [_params(write) for write in batch if write.ends]

        def work(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            if opens:
                connection.executemany(_UPSERT_OPEN, opens)
            if finishes:
                connection.executemany(_UPSERT_FINISH, finishes)
            connection.execute("COMMIT")

        await self._guarded(work)

    async def ping(self) -> None:
        def work(connection: sqlite3.Connection) -> None:
            # a write, not a read: a full disk still answers reads
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
            connection.execute("COMMIT")

        await self._guarded(work)

    async def heartbeat(self, instance: str, at: datetime) -> None:
        stamp = format_timestamp(at)
        params = (instance, socket.gethostname(), os.getpid(), stamp, stamp)

        def work(connection: sqlite3.Connection) -> None:
            connection.execute(_HEARTBEAT, params)

        await self._guarded(work)

    async def end_instance(self, instance: str, at: datetime) -> None:
        params = (format_timestamp(at), instance)

        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE instances SET state = 'closed', ended_at = ? WHERE instance = ?", params
            )

        await self._guarded(work)

    async def recover(
        self, instance: str, dead_after: float, dead: Collection[str], at: datetime
    ) -> int:
        cutoff = format_timestamp(at - timedelta(seconds=dead_after))

        def work(connection: sqlite3.Connection) -> int:
            connection.execute("BEGIN IMMEDIATE")
            candidates = connection.execute(
                "SELECT u.instance, i.state, i.heartbeat_at < ? FROM "
                "(SELECT DISTINCT instance FROM usage WHERE ended_at IS NULL) AS u "
                "LEFT JOIN instances AS i ON i.instance = u.instance",
                (cutoff,),
            ).fetchall()
            closed = 0
            for name, state, stale in candidates:
                if is_dead(name, state, None if stale is None else bool(stale), instance, dead):
                    closed += connection.execute(_CLOSE_OPEN_ROWS, (name,)).rowcount
                    connection.execute(
                        "UPDATE instances SET state = 'crashed', ended_at = heartbeat_at "
                        "WHERE instance = ? AND state = 'live'",
                        (name,),
                    )
            for name in set(dead) - {instance}:
                connection.execute(
                    "UPDATE instances SET state = 'crashed', ended_at = heartbeat_at "
                    "WHERE instance = ? AND state = 'live'",
                    (name,),
                )
            connection.execute("COMMIT")
            return closed

        return await self._guarded(work)

    # ------------------------------------------------------------------ reads

    async def query(self, since: datetime | None, until: datetime | None) -> list[UsageRow]:
        sql = select_sql("usage", "?", since=since is not None, until=until is not None)
        params = [format_timestamp(moment) for moment in (since, until) if moment is not None]
        found = await self._guarded(lambda connection: connection.execute(sql, params).fetchall())
        return [_row(values) for values in found]

    async def spent(self, key: str | None, since: datetime | None) -> tuple[int, float]:
        sql = spent_sql("usage", "?", keyed=key is not None, since=since is not None)
        params: list[object] = [] if key is None else [key]
        if since is not None:
            params.append(format_timestamp(since))
        tokens, cost = await self._guarded(
            lambda connection: connection.execute(sql, params).fetchone()
        )
        return int(tokens), float(cost)

    async def close(self) -> None:
        def work() -> None:
            if self._connection is not None:
                try:
                    self._connection.close()
                except sqlite3.Error:
                    pass  # nothing more can be done for it; the rows are accounted for
                self._connection = None

        try:
            await self._run(work)
        finally:
            self._executor.shutdown(wait=True)


class SQLiteLedger(QueuedLedger):
    """A ledger in one SQLite file (created with its parent directories for a writer).

    `instance` None opens an existing file to read only. Raises LedgerError from `open()`
    on an unwritable path, a file that is not an sserelay ledger (or not SQLite at all),
    or a schema newer than this code."""

    def __init__(
        self,
        path: Path,
        *,
        instance: str | None,
        busy_timeout: float = BUSY_TIMEOUT_S,
        **options: Unpack[QueueOptions],
    ) -> None:
        self.store = SQLiteStore(path, busy_timeout=busy_timeout)
        super().__init__(
            self.store,
            instance=instance,
            **options,
        )

    @property
    def path(self) -> Path:
        """The SQLite file."""
        return self.store.path

    @property
    def journal_mode(self) -> str:
        """`wal` once opened (anything else means the file system refused WAL)."""
        return self.store.journal_mode
