"""`sserelay usage`: what was billed, read back from a ledger, grouped and summed."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from sserelay.cli.options import EXIT_ERROR, option

if TYPE_CHECKING:
    from sserelay.ledger import UsageRow
    from sserelay.ledger.report import Group


@click.command(epilog="Exit codes: 0 read, 1 the ledger cannot be read, 2 usage error.")
@option(
    "--ledger",
    env="LEDGER",
    metavar="TARGET",
    help="The ledger to read: a SQLite path, a *.jsonl file or a postgresql:// URL "
    "[default: $XDG_STATE_HOME/sserelay/usage.db].",
)
@option(
    "--since",
    env="USAGE_SINCE",
    metavar="WHEN",
    help="Rows started at or after WHEN: a date (2026-11-26), a time (ISO 8601, UTC "
    "unless it says), or an age (30m, 24h, 7d).",
)
@option("--until", env="USAGE_UNTIL", metavar="WHEN", help="Rows started before WHEN.")
@option(
    "--by",
    "by",
    env="USAGE_BY",
    multiple=True,
    type=click.Choice(("key", "model", "day", "hour", "reason", "client")),
    help="Group by this (repeatable: --by key --by model).",
)
@option("--json", "as_json", env="USAGE_JSON", is_flag=True, help="One JSON object.")
@option("--csv", "as_csv", env="USAGE_CSV", is_flag=True, help="CSV, a header line first.")
def usage(
    ledger: str | None,
    since: str | None,
    until: str | None,
    by: tuple[str, ...],
    as_json: bool,
    as_csv: bool,
) -> None:
    """Show what a ledger holds: requests, tokens, bytes, reported usage and cost, per
    group, with a totals row. This is how "what did key X cost yesterday, per model" is
    answered:

    \b
      sserelay usage --since 2026-11-26 --until 2026-11-27 --by key --by model
    """
    from sserelay.errors import SSERelayError
    from sserelay.http.server import run_event_loop
    from sserelay.ledger import default_ledger_path, open_ledger
    from sserelay.ledger.report import aggregate, parse_when, to_csv, to_json

    if as_json and as_csv:
        raise click.UsageError("--json and --csv: give one")
    now = datetime.now(UTC)
    bounds = []
    for name, text in (("--since", since), ("--until", until)):
        try:
            bounds.append(None if text is None else parse_when(text, now))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'{name}'") from None
    target = ledger or str(default_ledger_path())

    async def read() -> tuple[list[UsageRow], str]:
        store = open_ledger(target, instance=None)
        async with store:
            return list(await store.query(bounds[0], bounds[1])), store.display

    try:
        rows, shown = run_event_loop(read())
    except SSERelayError as exc:
        click.echo(f"sserelay: error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    groups = aggregate(rows, list(by))
    if as_json:
        click.echo(to_json(groups))
    elif as_csv:
        click.echo(to_csv(groups), nl=False)
    else:
        _print_table(groups, shown)


def _print_table(groups: list[Group], shown: str) -> None:
    from rich.table import Table

    from sserelay.cli.display import table_console
    from sserelay.ledger.report import FIGURES, table_rows

    headers, rows = table_rows(groups)
    table = Table()
    first_figure = len(headers) - len(FIGURES)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < first_figure else "right")
    for index, row in enumerate(rows):
        table.add_row(*row, end_section=index == len(rows) - 2)
    console = table_console()
    # A line of its own: a table's title is padded with spaces to the table's width.
    console.print(f"usage: {shown}", markup=False)
    console.print(table)
