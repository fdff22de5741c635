"""`sserelay keys`: make a key, and see what each key has spent and has left."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from sserelay.cli.options import EXIT_ERROR, EXIT_USAGE, option

if TYPE_CHECKING:
    from sserelay.metering.budget import KeyStatus


@click.group()
def keys() -> None:
    """Keys for --keys: make one, or see each key's budget and spend."""


@keys.command("new")
@click.argument("name")
def new(name: str) -> None:
    """Print a fresh secret for key NAME, and the TOML lines to paste into the keys file.

    The lines hold the secret's SHA-256, not the secret: the file need not hold it. Give the
    secret to the client; it is not shown again.
    """
    from sserelay.metering.keys import new_key

    try:
        secret, lines = new_key(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'NAME'") from None
    click.echo(f"secret: {secret}")
    click.echo("add to the keys file:")
    click.echo(lines, nl=False)


@keys.command("status")
@option(
    "--keys",
    "keys_file",
    env="KEYS",
    required=True,
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="The keys file.",
)
@option(
    "--ledger",
    env="LEDGER",
    metavar="TARGET",
    help="The ledger that holds what the keys spent [default: the default ledger].",
)
@option(
    "--redis",
    env="REDIS",
    metavar="URL",
    help="The Redis that instances share budgets on: its figures, every instance's "
    "(seeded from the ledger where it has none).",
)
@option("--json", "as_json", env="JSON", is_flag=True, help="One JSON object.")
def status(keys_file: str, ledger: str | None, redis: str | None, as_json: bool) -> None:
    """Each key's budget, what it spent this period, what is left and when it resets."""
    import json

    from sserelay.errors import ConfigError, SSERelayError
    from sserelay.http.server import run_event_loop
    from sserelay.ledger import default_ledger_path, open_ledger
    from sserelay.metering.budget import Budgets, Spend, period_start
    from sserelay.metering.keys import KeyRing

    try:
        with open(keys_file, encoding="utf-8") as file:
            ring = KeyRing.from_toml(file.read(), keys_file)
    except ConfigError as exc:
        click.echo(f"sserelay: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    now = time.time()

    async def spent() -> dict[str, Spend]:
        store = open_ledger(ledger or str(default_ledger_path()), instance=None)
        found = {}
        async with store:
            for key in ring:
                since = datetime.fromtimestamp(period_start(key.period, now), UTC)
                tokens, cost = await store.spent(key.name, since)
                found[key.name] = Spend.of(tokens, cost)
        return found

    async def shared() -> list[KeyStatus]:
        from sserelay.cluster.budget import RedisBudgetStore
        from sserelay.cluster.connection import Connection

        seeds = await spent()
        said: list[str] = []
        connection = await Connection.open(redis or "", said.append)
        try:
            store = RedisBudgetStore(connection, "keys-status", said.append)
            budgets = Budgets(ring, spent=seeds, now=now, store=store)
            await store.start(budgets, now)
            await store.aclose()
            return budgets.status(now)
        finally:
            await connection.aclose()

    try:
        if redis is None:
            rows: list[KeyStatus] = Budgets(ring, spent=run_event_loop(spent()), now=now).status(
                now
            )
        else:
            rows = run_event_loop(shared())
    except ImportError:
        click.echo("sserelay: error: --redis needs pip install 'sserelay[redis]'", err=True)
        sys.exit(EXIT_ERROR)
    except SSERelayError as exc:
        click.echo(f"sserelay: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps({"keys": [_row(row) for row in rows]}))
        return
    _print_table(rows)


def _row(row: KeyStatus) -> dict[str, object]:
    from dataclasses import asdict

    out = asdict(row)
    out["period"] = str(out["period"])
    reset = out.pop("resets_at")
    out["resets_at"] = None if reset is None else _iso(reset)
    return dict(out)


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _print_table(rows: list[KeyStatus]) -> None:
    from rich.table import Table

    from sserelay.cli.display import table_console

    table = Table(title="keys", title_justify="left")
    for header in ("key", "period", "budget", "spent", "remaining", "resets", "tokens/min"):
        table.add_column(header, justify="left" if header in ("key", "period") else "right")
    for row in rows:
        data = _row(row)
        budget = _pair(data["budget_tokens"], data["budget_cost"])
        spent = _pair(data["spent_tokens"], data["spent_cost"] if data["budget_cost"] else None)
        left = _pair(data["remaining_tokens"], data["remaining_cost"])
        limit = data["tokens_per_minute"]
        used = data["tokens_last_minute"]
        rate = "-" if limit is None else f"{used or 0:,}/{limit:,}"
        table.add_row(
            str(data["name"]),
            str(data["period"]),
            budget,
            spent,
            left,
            str(data["resets_at"] or "-"),
            rate,
        )
    table_console().print(table)


def _pair(tokens: object, cost: object) -> str:
    parts = []
    if isinstance(tokens, int):
        parts.append(f"{tokens:,} tokens")
    if isinstance(cost, float | int) and not isinstance(cost, bool):
        parts.append(f"{cost:.6f}".rstrip("0").rstrip("."))
    return " + ".join(parts) or "-"
