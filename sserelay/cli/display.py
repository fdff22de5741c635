"""What a person sees, as text: the live line, the in-flight table, receipts and the bill.

Pure functions; `live.py` puts them on the terminal.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.cells import cell_len
from rich.console import Console

from sserelay.metering.bill import Bill, ClientBill, Totals
from sserelay.metering.meter import ClientMeter
from sserelay.metering.usage import Usage


def format_count(n: float) -> str:
    return f"{n:,.0f}"


def counted(n: int, noun: str) -> str:
    """`1 token`, `2 tokens`, `1,000 events`: the count and its noun, singular for one."""
    return f"{format_count(n)} {noun}{'' if n == 1 else 's'}"


def format_compact(n: float) -> str:
    """A count in at most 6 columns: as is below 10,000, else `12.3k`, `4.5M`, `6.7G`, `8.9T`."""
    if n < 10_000:
        return format_count(n)
    for unit in ("k", "M", "G", "T"):
        n /= 1000
        if n < 999.95 or unit == "T":
            return f"{n:.1f}{unit}"
    raise AssertionError("unreachable")


def format_short_cost(cost: float) -> str:
    """A cost in few columns: 4 significant digits below 1, cents up to 100, units above."""
    if cost >= 100:
        return f"{cost:,.0f}"
    if cost >= 1:
        return f"{cost:.2f}"
    return f"{cost:.4g}" if cost >= 0.0001 else format_cost(cost)


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_cost(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:.6f}".rstrip("0").rstrip(".") or "0"


@dataclass(frozen=True, slots=True)
class Field:
    """One labelled figure of a live line: its forms, longest first, and its rank (0 is the
    most important: the last to be shortened or dropped)."""

    rank: int
    forms: tuple[str, ...]


#: Fields of this rank or more important are shortened before any of them is dropped.
ESSENTIAL = 2
SEPARATOR = " · "


def fit_fields(fields: list[Field], width: int | None, separator: str = SEPARATOR) -> str:
    """`fields` joined in their order, in at most `width` columns (None: no limit): the least
    important fields are dropped first, then the essential ones shortened, then dropped. A
    field is never cut: a line that does not fit loses whole fields."""
    forms = dict.fromkeys(range(len(fields)), 0)

    def line() -> str:
        return separator.join(fields[i].forms[form] for i, form in sorted(forms.items()))

    def fits() -> bool:
        return width is None or cell_len(line()) <= width

    by_rank = sorted(range(len(fields)), key=lambda i: fields[i].rank, reverse=True)
    for i in by_rank:  # drop the unessential
        if fits():
            return line()
        if fields[i].rank > ESSENTIAL:
            del forms[i]
    for i in by_rank:  # shorten the essential
        while not fits() and i in forms and forms[i] + 1 < len(fields[i].forms):
            forms[i] += 1
    for i in by_rank:  # drop them too, keeping one
        if fits() or len(forms) == 1:
            break
        forms.pop(i, None)
    return line()


def totals_fields(totals: Totals) -> list[Field]:
    """The live figures, labelled, in the order they are shown."""
    served = format_count(totals.clients)
    connected = format_count(totals.active_clients)
    compact = f"clients {format_compact(totals.active_clients)}/{format_compact(totals.clients)}"
    tokens = (f"tokens {format_count(totals.tokens)}", f"tokens {format_compact(totals.tokens)}")
    clients = (
        f"clients {connected} connected / {served} served",
        f"clients {connected}/{served}",
        compact,
    )
    fields = [
        Field(0, tokens),
        Field(3, (f"{totals.tokens_per_s:,.1f} tok/s",)),
        Field(1, clients),
    ]
    if totals.cost is not None:
        costs = (f"cost {format_cost(totals.cost)}", f"cost {format_short_cost(totals.cost)}")
        fields.append(Field(2, costs))
    fields += [
        Field(5, (f"events {format_count(totals.events)}",)),
        Field(6, (format_bytes(totals.bytes),)),
        Field(4, (f"{totals.elapsed_s:.1f} s",)),
    ]
    return fields


def format_totals(totals: Totals, width: int | None = None) -> str:
    """One line of live figures, in at most `width` columns (see fit_fields)."""
    return fit_fields(totals_fields(totals), width)


def format_live_line(totals: Totals, width: int | None = None) -> str:
    """The live line: `sserelay: ` and the figures, the prefix dropped first when narrow."""
    prefix = "sserelay: "
    if width is None:
        return prefix + format_totals(totals)
    fields = totals_fields(totals)
    with_prefix = fit_fields(fields, width - len(prefix))
    without = fit_fields(fields, width)
    # The prefix goes first: it says the least.
    if cell_len(without) > cell_len(with_prefix) or cell_len(prefix + with_prefix) > width:
        return without
    return prefix + with_prefix


def format_bill(bill: Bill, ledger: str | None = None) -> str:
    """The bill as a compact human table (no colour, stable for scripts that grep it)."""
    ttfe = "-" if bill.time_to_first_event_s is None else f"{bill.time_to_first_event_s:.3f} s"
    rows = [
        f"sserelay bill: {bill.reason}",
        f"  tokens      {format_count(bill.tokens)} ({bill.tokenizer})",
        f"  events      {format_count(bill.events)}",
        f"  bytes       {format_count(bill.bytes)}",
        f"  duration    {bill.duration_s:.3f} s (first event {ttfe}, "
        f"{bill.tokens_per_s:,.1f} tokens/s)",
    ]
    if bill.cost is not None:
        basis = (
            "per-model prices"
            if bill.price_per_million is None
            else f"at {bill.price_per_million:g} per 1M"
        )
        rows.append(f"  cost        {format_cost(bill.cost)} ({basis})")
    if bill.invalid_utf8_bytes:
        rows.append(f"  input       {bill.invalid_utf8_bytes} invalid UTF-8 bytes replaced")
    if bill.upstream_usage is not None:
        usage = ", ".join(f"{k}={v}" for k, v in bill.upstream_usage.to_dict().items())
        rows.append(f"  upstream    {usage}")
    for c in bill.clients:
        rows.append(format_client_row(c))
        if c.request is not None:  # a proxied or mocked request
            rows.extend(
                textwrap.wrap(
                    format_request(c),
                    BILL_WIDTH,
                    initial_indent="    ",
                    subsequent_indent="      ",
                    break_on_hyphens=False,
                )
            )
    if bill.rows_omitted:
        where = f" are in the ledger {ledger}" if ledger else " are not listed"
        rows.append(f"  clients     {format_count(bill.client_count)} (their rows{where})")
        for model, figures in sorted(bill.by_model.items()):
            rows.append(f"  model {model:<20} {format_group(figures)}")
        for key, figures in sorted(bill.by_key.items()):
            rows.append(f"  key   {key:<20} {format_group(figures)}")
    elif not bill.clients:
        rows.append("  no client connected")
    return "\n".join(rows)


#: The bill's rows fit a terminal this wide.
BILL_WIDTH = 80


def format_client_row(c: ClientBill) -> str:
    """A client's row of the bill: 80 columns with an IPv4 peer, under 100M tokens and 1M
    events (a bill lists at most MAX_BILL_ROWS clients: ids of 3 digits)."""
    peer = c.peer or "-"
    return (
        f"  client {c.id:<3} {peer:<21} {format_count(c.tokens):>10} tok "
        f"{format_count(c.events):>6} ev  {c.reason}"
    )


def format_group(figures: dict[str, float | int | None]) -> str:
    """A model's or a key's sums, in one line."""
    cost = figures.get("cost")
    line = (
        f"{counted(int(figures.get('requests') or 0), 'request')} "
        f"{counted(int(figures.get('tokens') or 0), 'token')} "
        f"{format_count(figures.get('bytes') or 0)} bytes"
    )
    return line if cost is None else f"{line} cost {format_cost(float(cost))}"


def format_usage(usage: Usage) -> str:
    """An upstream's usage report; a count it did not report is `?`, never 0."""
    shown = {
        "input_tokens": "in",
        "output_tokens": "out",
        "total_tokens": "total",
        "cached_tokens": "cached",
        "cache_creation_tokens": "cache_write",
        "reasoning_tokens": "reasoning",
    }
    return " ".join(
        f"{shown.get(key, key)}={'?' if value is None else format_count(value)}"
        for key, value in usage.to_dict().items()
    )


def format_request(c: ClientBill) -> str:
    """What a proxied request was and what the upstream said about it."""
    request = c.request
    if request is None:
        return "-"
    parts = [request.method, request.path or "/", str(request.status or "-")]
    if request.model:
        parts.append(request.model)
    if c.upstream_usage is not None:
        parts.append(f"upstream {format_usage(c.upstream_usage)}")
    if c.cost is not None:
        parts.append(f"cost {format_cost(c.cost)}")
    if c.tokenizer is not None:
        name, estimate = c.tokenizer
        parts.append(f"[{name}{', estimate' if estimate else ''}]")
    return " ".join(parts)


def format_moment(wall: float) -> str:
    """A time of day for a log line: UTC, ISO 8601, milliseconds (`2026-11-27T18:54:33.123Z`)."""
    moment = datetime.fromtimestamp(wall, UTC)
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def format_receipt(c: ClientBill, error: str | None = None) -> str:
    """The one line printed when a proxied request ends: an access log line, with the UTC
    time it ended and its request id first, so it can go to a file or journald."""
    ended = format_moment(c.started_wall + c.duration_s)
    line = (
        f"{ended} {c.request_id} {format_request(c)} · {counted(c.tokens, 'token')} · "
        f"{counted(c.events, 'event')} · {format_bytes(c.bytes)} · {c.duration_s:.3f} s · "
        f"{c.reason}"
    )
    apart = c.apart
    if apart is not None and apart > RECONCILE and c.upstream_usage is not None:
        # Metered and reported differ past the tolerance: say so, for reconciliation.
        line += (
            f" (metered {format_count(c.tokens)} vs reported "
            f"{format_count(c.upstream_usage.output_tokens or 0)} output tokens: "
            f"{apart:.0%} apart)"
        )
    return f"{line}: {error}" if error else line


#: Metered and reported output tokens this far apart (a fraction) are flagged in receipts.
RECONCILE = 0.10


@dataclass(frozen=True, slots=True)
class Column:
    """A column of the in-flight table: its title, rank (0: dropped last), alignment."""

    title: str
    rank: int
    right: bool = False


IN_FLIGHT_COLUMNS = (
    Column("in flight", 5),
    Column("key", 3),
    Column("model", 0),
    Column("tokens", 1, right=True),
    Column("tok/s", 4, right=True),
    Column("s", 2, right=True),
)
#: The widest a model or key name is shown (longer ones end in `…`).
NAME_WIDTH = 24


def _short(text: str, width: int = NAME_WIDTH) -> str:
    return text if cell_len(text) <= width else text[: width - 1] + "…"


def format_in_flight(
    clients: list[ClientMeter], now: float, width: int | None = None, limit: int = 8
) -> list[str]:
    """The in-flight table (proxy, serve --as): a title row and a row per request, columns
    dropped least important first so every row fits `width`; past `limit` requests, a row
    says how many more."""
    if not clients:
        return []
    cells = []
    for client in clients[:limit]:
        elapsed = max(0.0, now - client.opened_at)
        request = client.request
        what = "-" if request is None else f"{request.method} {request.path or '/'}"
        cells.append(
            [
                _short(what, 28),
                _short(client.key or "-"),
                _short(client.model or "-"),
                format_count(client.tokens),
                f"{client.tokens / elapsed if elapsed > 0 else 0.0:,.1f}",
                f"{elapsed:.1f}",
            ]
        )
    keep = list(range(len(IN_FLIGHT_COLUMNS)))
    if not any(client.key for client in clients):
        keep.remove(1)  # no keys in use: no column for them

    def render() -> list[str]:
        widths = {
            i: max(cell_len(IN_FLIGHT_COLUMNS[i].title), *(cell_len(row[i]) for row in cells))
            for i in keep
        }

        def row(values: list[str]) -> str:
            parts = []
            for i in keep:
                pad = widths[i] - cell_len(values[i])
                right = IN_FLIGHT_COLUMNS[i].right
                parts.append(" " * pad + values[i] if right else values[i] + " " * pad)
            return "  " + "  ".join(parts).rstrip()

        return [row([c.title for c in IN_FLIGHT_COLUMNS]), *(row(values) for values in cells)]

    lines = render()
    by_rank = sorted(keep, key=lambda i: IN_FLIGHT_COLUMNS[i].rank, reverse=True)
    for i in by_rank[:-1]:
        if width is None or max(cell_len(line) for line in lines) <= width:
            break
        keep.remove(i)
        lines = render()
    if len(clients) > limit:
        lines.append(f"  … and {len(clients) - limit} more")
    return lines


#: The width a table on stdout gets when stdout is not a terminal: wide enough that no column
#: of `sserelay usage` or `keys status` is cut (a pipe or a file has no width to fit).
UNBOUNDED_WIDTH = 1000


def table_console() -> Console:
    """The Console that prints a report's table on stdout: fitted to a terminal, uncut elsewhere."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=UNBOUNDED_WIDTH)
    return console
