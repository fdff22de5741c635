"""What a person sees: the live counter on stderr and the bill on stdout.

`format_*` functions are pure; the classes render them. One stderr Console is
made by the CLI and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

from rich.console import Console
from rich.live import Live
from rich.text import Text

from sserelay.metering.bill import Bill, ClientBill, Totals
from sserelay.metering.meter import ClientMeter, MeterObserver
from sserelay.metering.usage import Usage


def format_count(n: float) -> str:
    return f"{n:,.0f}"


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_cost(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:.6f}".rstrip("0").rstrip(".") or "0"


def format_totals(totals: Totals) -> str:
    """One line of live figures."""
    line = (
        f"{format_count(totals.tokens)} tokens · {format_count(totals.events)} events · "
        f"{format_bytes(totals.bytes)} · {totals.tokens_per_s:,.1f} tok/s · "
        f"{totals.elapsed_s:.1f} s · clients {totals.active_clients}/{totals.clients}"
    )
    if totals.cost is not None:
        line += f" · cost {format_cost(totals.cost)}"
    return line


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
        rows.append(
            f"  client {c.id:<4} {c.peer or '-':<22} {format_count(c.tokens):>10} tokens "
            f"{format_count(c.events):>8} events {format_count(c.bytes):>12} bytes  {c.reason}"
        )
        if c.request is not None:  # a proxied or mocked request
            rows.append(f"              {format_request(c)}")
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


def format_group(figures: dict[str, float | int | None]) -> str:
    """A model's or a key's sums, in one line."""
    cost = figures.get("cost")
    line = (
        f"{format_count(figures.get('requests') or 0)} requests "
        f"{format_count(figures.get('tokens') or 0)} tokens "
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
        f"{ended} {c.request_id} {format_request(c)} · {format_count(c.tokens)} tokens · "
        f"{format_count(c.events)} events · {format_bytes(c.bytes)} · {c.duration_s:.3f} s · "
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


def format_active(client: ClientMeter, now: float) -> str:
    """A live row for a request still being proxied."""
    elapsed = now - client.opened_at
    rate = client.tokens / elapsed if elapsed > 0 else 0.0
    request = client.request
    what = "-" if request is None else f"{request.method} {request.path or '/'}"
    return (
        f"{what} {client.model or '-'} · {format_count(client.tokens)} tokens · {rate:,.1f} tok/s"
    )


class LiveCounter:
    """The running figures on stderr: a rich live line on a terminal, a plain
    line every `plain_interval` seconds otherwise, nothing when quiet."""

    def __init__(
        self,
        console: Console,
        totals: Callable[[], Totals],
        *,
        quiet: bool = False,
        plain_interval: float = 10.0,
        rows: Callable[[], list[str]] | None = None,
    ) -> None:
        self._console = console
        self._totals = totals
        self._rows = rows
        self._quiet = quiet
        self._plain_interval = plain_interval
        self._live: Live | None = None
        self._ticker: asyncio.Task[None] | None = None

    def _render(self) -> Text:
        text = Text("sserelay: " + format_totals(self._totals()), style="bold cyan")
        # One row per active request (proxy), under the totals; only on a terminal.
        for row in self._rows() if self._rows is not None else []:
            text.append("\n  " + row, style="cyan")
        return text

    def start(self) -> None:
        if self._quiet:
            return
        if self._console.is_terminal:
            self._live = Live(
                get_renderable=self._render,
                console=self._console,
                refresh_per_second=8,
                transient=False,
            )
            self._live.start()
        else:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        last = None
        while True:
            await asyncio.sleep(self._plain_interval)
            totals = self._totals()
            figures = (totals.tokens, totals.events, totals.bytes, totals.active_clients)
            if figures == last:
                continue  # an idle relay does not fill a log with the same line
            last = figures
            self._console.print("sserelay: " + format_totals(totals), highlight=False)

    async def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None


class Receipts(MeterObserver):
    """Prints a receipt line on stderr as each request (`serve --as`, `proxy`) ends. With
    `errors` false the request's error is left out (with `--once` it is the run's, printed
    as `sserelay: error:`, not twice)."""

    def __init__(self, console: Console, *, errors: bool = True) -> None:
        self._console = console
        self._errors = errors

    def closed(self, bill: ClientBill) -> None:
        if bill.request is None:
            return
        receipt = format_receipt(bill, bill.error if self._errors else None)
        self._console.print(f"sserelay: {receipt}", highlight=False, markup=False)
