"""The terminal while a run lasts: the live counter on stderr and per-request receipts.

They render display.py's text. One stderr Console is made by the CLI and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text

from sserelay.cli.display import format_live_line, format_receipt
from sserelay.metering.bill import ClientBill, Totals
from sserelay.metering.meter import MeterObserver

__all__ = ["LiveCounter", "Receipts"]


class LiveCounter:
    """The running figures on stderr: a rich live view on a terminal (the in-flight table of
    `rows`, then the totals, fitted to the terminal's width), a plain line every
    `plain_interval` seconds otherwise, nothing when quiet.

    With `typing` (stdin is the terminal the source is typed on), a live view would redraw
    over the line being typed: instead a plain line is printed each time `progress` (what the
    stream has sent) moves, which is right after a line was entered."""

    def __init__(
        self,
        console: Console,
        totals: Callable[[], Totals],
        *,
        quiet: bool = False,
        plain_interval: float = 10.0,
        rows: Callable[[int | None], list[str]] | None = None,
        typing: bool = False,
        progress: Callable[[], int] | None = None,
    ) -> None:
        self._console = console
        self._totals = totals
        self._rows = rows
        self._quiet = quiet
        self._plain_interval = plain_interval
        self._typing = typing
        self._progress = progress
        self._live: Live | None = None
        self._ticker: asyncio.Task[None] | None = None

    def _width(self) -> int:
        # One column spare: a line that fills the last column makes some terminals wrap.
        return max(20, self._console.width - 1)

    def _render(self) -> Text:
        width = self._width()
        text = Text(no_wrap=True, overflow="crop")
        # The requests in flight (proxy, serve --as), above the totals; only on a terminal.
        for row in self._rows(width) if self._rows is not None else []:
            text.append(row + "\n", style="cyan")
        text.append(format_live_line(self._totals(), width), style="bold cyan")
        return text

    def start(self) -> None:
        if self._quiet:
            return
        loop = asyncio.get_running_loop()
        if self._console.is_terminal and self._typing:
            self._ticker = loop.create_task(self._follow_typing())
        elif self._console.is_terminal:
            self._live = Live(
                get_renderable=self._render,
                console=self._console,
                refresh_per_second=8,
                transient=False,
            )
            self._live.start()
        else:
            self._ticker = loop.create_task(self._tick())

    async def _tick(self) -> None:
        last = None
        while True:
            await asyncio.sleep(self._plain_interval)
            totals = self._totals()
            figures = (totals.tokens, totals.events, totals.bytes, totals.active_clients)
            if figures == last:
                continue  # an idle relay does not fill a log with the same line
            last = figures
            self._console.print(format_live_line(totals), highlight=False, markup=False)

    async def _follow_typing(self) -> None:
        progress = self._progress or (lambda: self._totals().events)
        last = progress()
        while True:
            await asyncio.sleep(0.1)
            now = progress()
            if now != last:
                last = now
                line = format_live_line(self._totals(), self._width())
                self._console.print(line, highlight=False, markup=False, style="cyan")

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
