"""What the SQL backends share: the schema version, the migration rule, the statements
that do not differ but for their placeholder, and the rule that says an instance is dead.

Tables (SQLite: in the file; PostgreSQL: in the schema `sserelay`):

- `meta (key, value)`: `schema_version` is the version of the tables below.
- `usage`: one row per billed unit, the columns of `UsageRow` in order, plus `updated_at`
  (when its figures were last stored; a crash recovery ends a row at that moment).
  Primary key (instance, id, started_at); indexes on started_at, (key, started_at), and
  the open rows per instance.
- `instances (instance, host, pid, started_at, heartbeat_at, ended_at, state)`: every
  writer; state `live`, `closed` (ended cleanly) or `crashed` (recovered by another).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Sequence
from typing import Any

from .errors import LedgerError
from .row import COLUMNS

#: The version of the tables this code reads and writes.
SCHEMA_VERSION = 1

KEY_COLUMNS = ("instance", "id", "started_at")
#: Every stored column of `usage`, in table order.
USAGE_COLUMNS = (*COLUMNS, "updated_at")


def migration_steps(found: int, name: str, migrations: Sequence[object]) -> range:
    """The migrations to run on a ledger at version `found` (0: empty). Raises LedgerError
    for a version newer than this code: an older sserelay must not write a newer schema."""
    if found > len(migrations):
        raise LedgerError(
            f"{name} has schema version {found}, newer than this sserelay knows "
            f"({len(migrations)}); upgrade sserelay"
        )
    return range(found, len(migrations))


def upsert_sql(table: str, mark: str, *, ends: bool) -> str:
    """Insert a row, or update the stored one with the same key. A start or checkpoint
    (`ends` False) never updates an ended row: a late checkpoint must not reopen it; a
    finish (`ends` True) overwrites, so a row a recovery closed as crashed while this
    instance was cut off gets its true figures when the instance comes back."""
    columns = ", ".join(USAGE_COLUMNS)
    marks = ", ".join([mark] * len(USAGE_COLUMNS))
    updates = ", ".join(
        f"{column} = excluded.{column}" for column in USAGE_COLUMNS if column not in KEY_COLUMNS
    )
    guard = "" if ends else " WHERE stored.ended_at IS NULL"
    return (
        f"INSERT INTO {table} AS stored ({columns}) VALUES ({marks}) "
        f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET {updates}{guard}"
    )


def select_sql(table: str, mark: str, *, since: bool, until: bool) -> str:
    conditions = []
    if since:
        conditions.append(f"started_at >= {mark}")
    if until:
        conditions.append(f"started_at < {mark}")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    return f"SELECT {', '.join(COLUMNS)} FROM {table}{where} ORDER BY started_at, instance, id"


def spent_sql(table: str, mark: str, *, keyed: bool, since: bool) -> str:
    conditions = [f"key = {mark}" if keyed else "key IS NULL"]
    if since:
        conditions.append(f"started_at >= {mark}")
    return (
        f"SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM {table} "
        f"WHERE {' AND '.join(conditions)}"
    )


def is_dead(
    instance: str, state: str | None, stale: bool | None, own: str, dead: Collection[str]
) -> bool:
    """Whether the open rows of `instance` belong to no live writer. `state` and `stale`
    (heartbeat older than the cutoff) are None when the instance never registered. An
    instance of this host whose process is gone is dead at once, heartbeat or not."""
    if instance == own:
        return False
    if instance in dead or state is None or state != "live" or bool(stale):
        return True
    return _gone_from_this_host(instance)


def _gone_from_this_host(instance: str) -> bool:
    """Whether `instance` (`HOST-PID-RANDOM`, see new_instance_id) names a process of this
    host that no longer exists. A pid since reused by another process looks alive: then
    only its heartbeat going stale says it died, which is slower but never wrong."""
    parts = instance.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's), or the question cannot be asked
        return False
    return False


def row_values(values: Sequence[Any]) -> dict[str, Any]:
    """A stored row's columns by name (in the order of COLUMNS)."""
    return dict(zip(COLUMNS, values, strict=True))
