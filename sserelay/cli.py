"""The `sserelay` command: click options in, one run, a bill out, a documented exit code."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from .meter import Bill

#: Exit codes (documented in --help, README.md and man/sserelay.1).
EXIT_COMPLETE = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CODES = {
    "complete": EXIT_COMPLETE,
    "client_disconnected": 3,
    "upstream_error": 4,
    "input_error": 5,
    "slow_client": 6,
    "interrupted": 130,
}
EXIT_SIGTERM = 143

EXIT_CODES_HELP = """\b
Exit codes:
  0    complete: the stream ended and every client got all of it
  1    error: could not start (port in use, bad address) or write the bill
  2    usage error
  3    client_disconnected: the client went away before the end
  4    upstream_error: the upstream failed
  5    input_error: the input could not be read
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM
"""

F = TypeVar("F", bound=Callable[..., Any])


def _common_options(command: F) -> F:
    """Options every command shares; each also reads SSERELAY_<OPTION>."""
    options = [
        click.option(
            "--host",
            default="127.0.0.1",
            show_default=True,
            envvar="SSERELAY_HOST",
            help="Address to listen on.",
        ),
        click.option(
            "--port",
            default=8000,
            show_default=True,
            type=click.IntRange(0, 65535),
            envvar="SSERELAY_PORT",
            help="Port to listen on; 0 picks a free one.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            envvar="SSERELAY_JSON",
            help="Print the bill as one JSON object.",
        ),
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            envvar="SSERELAY_QUIET",
            help="No live counter on stderr.",
        ),
        click.option(
            "--tokenizer",
            default="whitespace",
            show_default=True,
            envvar="SSERELAY_TOKENIZER",
            metavar="NAME",
            help="How tokens are counted: whitespace (words) or chars.",
        ),
        click.option(
            "--price",
            type=click.FloatRange(min=0),
            default=None,
            envvar="SSERELAY_PRICE",
            metavar="AMOUNT",
            help="Price per 1M tokens; the bill then shows the cost.",
        ),
        click.option(
            "--heartbeat",
            type=click.FloatRange(min=0),
            default=15.0,
            show_default=True,
            envvar="SSERELAY_HEARTBEAT",
            metavar="SECONDS",
            help="Send a ': ping' comment on a stream idle this long; 0 turns it off.",
        ),
        click.option(
            "--no-ids",
            is_flag=True,
            envvar="SSERELAY_NO_IDS",
            help="Do not number events with an id: field.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", "-V", prog_name="sserelay")
def main() -> None:
    """Relay a stream of text chunks as Server-Sent Events, counting every token.

    Point `curl -N`, a browser's EventSource or an SDK at the printed URL.
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("source", required=False, default="-", metavar="[SOURCE]")
@_common_options
def serve(
    source: str,
    host: str,
    port: int,
    as_json: bool,
    quiet: bool,
    tokenizer: str,
    price: float | None,
    heartbeat: float,
    no_ids: bool,
) -> None:
    """Serve SOURCE (a file, or - / nothing for stdin) as a live SSE stream.

    Each line becomes one event the moment it is read. The first client to
    connect to / (or /events) gets the stream; when the stream ends or the
    client leaves, the bill is printed on stdout and sserelay exits.

    \b
    Example:
      cat tokens.txt | sserelay serve --port 8000
      curl -N http://127.0.0.1:8000/
    """
    from rich.console import Console

    from .errors import SourceError
    from .sources import LineSource
    from .tokens import get_tokenizer

    console = Console(stderr=True, highlight=False)
    try:
        counter = get_tokenizer(tokenizer)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="'--tokenizer'") from None
    try:
        line_source = LineSource(source)
    except SourceError as exc:
        _fail(console, str(exc), EXIT_CODES["input_error"])
    run = _ServeRun(console, line_source, counter.name, counter.count, price, quiet)
    bill, error, signum = run.start(host, port, heartbeat or None, not no_ids)
    _finish(console, bill, error, signum, as_json)


class _ServeRun:
    """Wires source, meter, app, server and display for one `serve` run."""

    def __init__(
        self,
        console: Console,
        source: Any,
        tokenizer: str,
        count: Callable[[str], int],
        price: float | None,
        quiet: bool,
    ) -> None:
        self.console = console
        self.source = source
        self.tokenizer = tokenizer
        self.count = count
        self.price = price
        self.quiet = quiet

    def start(
        self, host: str, port: int, heartbeat: float | None, ids: bool
    ) -> tuple[Bill, str | None, int | None]:
        from .server import ListenError, listen

        try:
            sock = listen(host, port)
        except ListenError as exc:
            _fail(self.console, str(exc), EXIT_ERROR)
        try:
            return asyncio.run(self._run(sock, heartbeat, ids))
        except KeyboardInterrupt:  # a Ctrl-C before the loop's handlers were in place
            sys.exit(EXIT_CODES["interrupted"])

    async def _run(
        self, sock: Any, heartbeat: float | None, ids: bool
    ) -> tuple[Bill, str | None, int | None]:
        from .app import StreamSession, create_app
        from .display import LiveCounter
        from .meter import Meter
        from .server import bound_address, serve_app

        meter = Meter(self.tokenizer, self.price)
        session = StreamSession(self.source, meter, count=self.count, ids=ids, heartbeat=heartbeat)
        signals: list[int] = []

        def on_signal(signum: int) -> None:
            signals.append(signum)
            session.interrupt()

        self.console.print(f"sserelay: serving on {bound_address(sock).url}", highlight=False)
        live = LiveCounter(self.console, meter.totals, quiet=self.quiet)
        live.start()
        try:
            await serve_app(
                create_app(session), sock, finished=session.finished, on_signal=on_signal
            )
        finally:
            await live.stop()
        bill = meter.bill(session.reason or "interrupted")
        return bill, session.error, signals[0] if signals else None


def _fail(console: Console, message: str, code: int) -> None:
    console.print(f"sserelay: error: {message}", highlight=False, markup=False)
    sys.exit(code)


def _finish(
    console: Console, bill: Bill, error: str | None, signum: int | None, as_json: bool
) -> None:
    from .display import format_bill

    if error:
        console.print(f"sserelay: error: {error}", highlight=False, markup=False)
    if bill.invalid_utf8_bytes:
        console.print(
            f"sserelay: warning: {bill.invalid_utf8_bytes} invalid UTF-8 bytes "
            "were replaced with U+FFFD",
            highlight=False,
        )
    text = json.dumps(bill.to_dict()) if as_json else format_bill(bill)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError) as exc:
        _silence_stdout()
        reason = "closed" if isinstance(exc, BrokenPipeError) else (exc.strerror or str(exc))
        _fail(console, f"cannot write the bill to stdout: {reason}", EXIT_ERROR)
    if bill.reason == "interrupted" and signum == signal.SIGTERM:
        sys.exit(EXIT_SIGTERM)
    sys.exit(EXIT_CODES.get(bill.reason, EXIT_ERROR))


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; a closed pipe would print a second error there.
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
