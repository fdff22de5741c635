"""The `sserelay` command: click options in, a config, `run()`, the bill out, an exit code."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from sserelay import __version__
from sserelay.cli.keys import keys
from sserelay.cli.options import (
    EXIT_CODES,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_SIGTERM,
    EXIT_USAGE,
    CommandAfterDashes,
    common_options,
    option_of,
    print_tokenizers,
    proxy_options,
    serve_options,
)
from sserelay.cli.usage import usage

if TYPE_CHECKING:
    from rich.console import Console

    from sserelay.http.config import Config
    from sserelay.http.limits import RequestLimits
    from sserelay.http.run import Running, RunResult


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", "-V", prog_name="sserelay")
def main() -> None:
    """Relay a stream of text chunks as Server-Sent Events, counting every token.

    Point `curl -N`, a browser's EventSource or an SDK at the printed URL.
    """


#: An option left at its default (not given on the command line or in the environment).
_DEFAULT = click.core.ParameterSource.DEFAULT


@main.command(cls=CommandAfterDashes, epilog=EXIT_CODES_HELP)
@serve_options
@common_options
def serve(**options: Any) -> None:
    """Serve SOURCE (a file, or - / nothing for stdin) as a live SSE stream.

    Each line (or word, or read: --chunk) becomes one event the moment it is
    read. Every client that connects to / (or /events) gets the stream: the
    source is read once, and a client that connects late, or comes back with
    Last-Event-ID (or ?last_event_id=), first gets the events it missed from
    the history. When the stream has ended and every client has finished, or
    the last client leaves before the end, the bill is printed on stdout and
    sserelay exits; with --keep it serves until Ctrl-C. /ui is a live page.

    With -- CMD [ARGS]..., sserelay runs CMD and serves its output. CMD's
    stdout is a pseudo-terminal, so it line-buffers as in a terminal (no
    stdbuf needed); its stdin is /dev/null; its stderr is kept, and its last
    line is reported if CMD fails (non-zero exit: input_error). It is stopped
    with its children (SIGTERM, then SIGKILL) when the run ends.

    With --redis URL --topic NAME the stream is published to a Redis stream
    that any number of instances serve with --redis URL --follow NAME; event
    ids are the topic's, so a client resumes on any of them.

    \b
    Examples:
      cat tokens.txt | sserelay serve --port 8000
      sserelay serve -- python3 generate.py --n 100
      curl -N http://127.0.0.1:8000/
      sserelay serve answer.txt --redis redis://127.0.0.1:6379/0 --topic news
      sserelay serve --redis redis://127.0.0.1:6379/0 --follow news --port 8001
    """
    from sserelay.http.config import MockConfig, ServeConfig

    ctx = click.get_current_context()
    as_json, quiet, receipts = _view_options(options)
    provider, once = options.pop("provider"), options.pop("once")
    common = _common(options, ledger_by_default=provider is not None)
    paced = {
        name: options.pop(name)
        for name in ("source", "command", "chunk", "rate", "delay", "realtime")
    }
    if paced["command"] and ctx.get_parameter_source("source") is not _DEFAULT:
        raise click.UsageError("SOURCE and -- CMD are two sources: give one")
    if provider is None:
        if once:
            raise click.UsageError("--once goes with --as (a plain stream ends by itself)")
        config: Config = _config(ServeConfig, **common, **paced, **options)
    else:
        for name in ("keep", "history", "max_lag", "linger", "topic", "follow"):
            if ctx.get_parameter_source(name) is not _DEFAULT:
                flag = option_of(name)
                raise click.UsageError(f"{flag} is for a broadcast stream; --as answers "
                                       "each request anew")  # fmt: skip
        config = _config(MockConfig, **common, **paced, provider=provider, once=once)
    _run(config, as_json=as_json, quiet=quiet, receipts=receipts)


@main.command(epilog=EXIT_CODES_HELP)
@proxy_options
@common_options
def proxy(**options: Any) -> None:
    """Relay a streaming upstream (an LLM API) to local clients, metering every token.

    Each request is forwarded to the upstream and its answer relayed the moment
    it arrives: SSE event by event, NDJSON and other bodies chunk by chunk. The
    meter counts the text inside OpenAI, Responses, Anthropic, Ollama and
    Gemini payloads and records the usage the upstream reports. A client that
    hangs up gets its upstream connection closed at once. Each finished request
    prints a receipt on stderr; Ctrl-C prints the total bill. Upstream ids are
    relayed as they are (--no-ids has no effect here); /healthz is answered
    locally.

    \b
    Example:
      sserelay proxy --upstream https://api.openai.com/v1 \\
          --upstream-header "Authorization: Bearer $OPENAI_API_KEY"
      OPENAI_BASE_URL=http://127.0.0.1:8000/ python my_app.py
    """
    from sserelay.http.config import ProxyConfig

    as_json, quiet, receipts = _view_options(options)
    common = _common(options, ledger_by_default=True)
    force, append = options.pop("force"), options.pop("append")
    if force and append:
        raise click.UsageError("--force overwrites the recording, --append adds to it: not both")
    if (force or append) and options["record"] is None:
        raise click.UsageError(f"{'--force' if force else '--append'} goes with --record")
    mode = "overwrite" if force else "append" if append else "new"
    config = _config(ProxyConfig, **common, **options, record_mode=mode)
    _run(config, as_json=as_json, quiet=quiet, receipts=receipts)


def _view_options(options: dict[str, Any]) -> tuple[bool, bool, bool]:
    """--json, --quiet (the live view) and receipts (not --no-receipts), taken out."""
    return options.pop("as_json"), options.pop("quiet"), not options.pop("no_receipts")


def _common(options: dict[str, Any], *, ledger_by_default: bool) -> dict[str, Any]:
    """The options every command shares, as config fields (taken out of `options`).
    A request-billing run (`proxy`, `serve --as`) keeps a ledger unless told not to, and
    counts each request with its model's tokenizer unless told otherwise."""
    from sserelay.http.access import Access
    from sserelay.ledger import default_ledger_path

    ledger, no_ledger = options.pop("ledger"), options.pop("no_ledger")
    if ledger is not None and no_ledger:
        raise click.UsageError("--ledger and --no-ledger say opposite things: give one")
    if ledger is None and ledger_by_default and not no_ledger:
        ledger = str(default_ledger_path())
    tokenizer = options.pop("tokenizer") or ("auto" if ledger_by_default else "whitespace")

    limits = _limits(options)
    access = Access(
        token=options.pop("auth_token"),
        max_clients=options.pop("max_clients"),
        cors_origin=options.pop("cors_origin"),
    )
    return {
        "host": options.pop("host"),
        "port": options.pop("port"),
        "tokenizer": tokenizer,
        "price": options.pop("price"),
        "heartbeat": options.pop("heartbeat"),
        "ids": not options.pop("no_ids"),
        "access": access,
        "ledger": ledger,
        "checkpoint": options.pop("checkpoint"),
        "keys": options.pop("keys"),
        "admin_token": options.pop("admin_token"),
        "metrics": not options.pop("no_metrics"),
        "redis": options.pop("redis"),
        "limits": limits,
    }


def _limits(options: dict[str, Any]) -> RequestLimits:
    """The request limits (taken out of `options`), or a usage error on the bad one."""
    from sserelay.errors import ConfigError
    from sserelay.http.limits import RequestLimits

    try:
        return RequestLimits(
            line_bytes=options.pop("max_line_bytes"),
            head_bytes=options.pop("max_head_bytes"),
            headers=options.pop("max_headers"),
            head_timeout=options.pop("head_timeout"),
            body_bytes=options.pop("max_body_bytes"),
        )
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(exc.field)) from None


def _config(kind: Callable[..., Config], **fields: Any) -> Config:
    """The config, or a usage error on the option that set a bad field."""
    from sserelay.errors import ConfigError

    try:
        return kind(**fields)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(exc.field)) from None


def _hint(field: str | None) -> str | None:
    flag = option_of(field)
    return None if flag is None else f"'{flag}'"


def _run(config: Config, *, as_json: bool, quiet: bool, receipts: bool) -> NoReturn:
    """Run `config` with the live view on stderr, then print the bill and exit."""
    from rich.console import Console

    from sserelay.errors import ConfigError, SourceError, SSERelayError
    from sserelay.http.server import run_event_loop

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    _fill_closed_std_fds()
    said: list[str] = []
    try:
        result = run_event_loop(_serve_live(config, console, quiet, receipts, said))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=_hint(exc.field)) from None
    except SSERelayError as exc:
        code = EXIT_CODES["input_error"] if isinstance(exc, SourceError) else EXIT_ERROR
        _fail(console, str(exc), code)
    except KeyboardInterrupt:  # a Ctrl-C before the loop's handlers were in place
        sys.exit(EXIT_CODES["interrupted"])
    _finish(console, result, as_json, said)


async def _serve_live(
    config: Config, console: Console, quiet: bool, receipts: bool, said: list[str]
) -> RunResult:
    from sserelay.cli.display import format_in_flight
    from sserelay.cli.live import LiveCounter, Receipts
    from sserelay.http.config import MockConfig, ProxyConfig, ServeConfig
    from sserelay.http.run import run

    per_request = isinstance(config, MockConfig | ProxyConfig)
    once = per_request and config.once  # type: ignore[union-attr]
    observers = [Receipts(console, errors=not once)] if receipts and per_request else []
    live: list[LiveCounter] = []
    # The source is typed on this terminal: say how to end it, and keep the counter off the
    # line being typed.
    typing = (
        isinstance(config, ServeConfig | MockConfig)
        and config.source == "-"
        and not config.command  # serve -- CMD reads the command, not the terminal
        and sys.stdin is not None
        and sys.stdin.isatty()
    )

    def on_ready(running: Running) -> None:
        kept = "" if running.ledger is None else f" (usage ledger: {running.ledger})"
        lines = [f"serving on {running.url}{kept}", *running.notes]
        if typing:
            lines.append("reading the terminal: type lines, Ctrl-D to end")
        for line in lines:
            console.print(f"sserelay: {line}", highlight=False, markup=False)

        def rows(width: int | None) -> list[str]:
            return format_in_flight(running.active(), running.now(), width)

        def progress() -> int:
            # What the stream has sent: the furthest client's events (a client that joins
            # late and gets the history does not move it).
            return max((client.events for client in running.active()), default=0)

        counter = LiveCounter(
            console,
            running.totals,
            quiet=quiet,
            rows=rows if running.per_request else None,
            typing=typing,
            progress=progress,
        )
        counter.start()
        live.append(counter)

    def warn(message: str) -> None:
        said.append(message)
        console.print(f"sserelay: warning: {message}", highlight=False, markup=False)

    try:
        return await run(config, observers=observers, on_ready=on_ready, on_warning=warn)
    finally:
        for counter in live:
            await counter.stop()


def _fail(console: Console, message: str, code: int) -> NoReturn:
    console.print(f"sserelay: error: {message}", highlight=False, markup=False)
    sys.exit(code)


def _finish(
    console: Console, result: RunResult, as_json: bool, already_said: list[str]
) -> NoReturn:
    from sserelay.cli.display import format_bill

    bill = result.bill
    for warning in result.warnings:
        if not any(warning is said for said in already_said):  # said live, during the run
            console.print(f"sserelay: warning: {warning}", highlight=False, markup=False)
    if result.error:
        console.print(f"sserelay: error: {result.error}", highlight=False, markup=False)
    if bill.invalid_utf8_bytes:
        console.print(
            f"sserelay: warning: {bill.invalid_utf8_bytes} invalid UTF-8 bytes "
            "were replaced with U+FFFD",
            highlight=False,
        )
    if as_json:
        data = bill.to_dict()
        if result.ledger is not None:
            data["ledger"] = result.ledger
        text = json.dumps(data, allow_nan=False)
    else:
        text = format_bill(bill, result.ledger)
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError) as exc:
        _silence_stdout()
        reason = "closed" if isinstance(exc, BrokenPipeError) else (exc.strerror or str(exc))
        _fail(console, f"cannot write the bill to stdout: {reason}", EXIT_ERROR)
    if result.unwritten:  # rows the ledger lost are in a fallback file, but not where asked
        sys.exit(EXIT_ERROR)
    if bill.reason == "interrupted" and result.signal == signal.SIGTERM:
        sys.exit(EXIT_SIGTERM)
    sys.exit(EXIT_CODES.get(bill.reason, EXIT_ERROR))


def _fill_closed_std_fds() -> None:
    """Started with stdin, stdout or stderr closed (`<&-`), the next descriptor opened
    (the event loop's own) would take its number, and libuv aborts when it closes one
    of 0-2: give each closed one /dev/null first. Python has already seen the closed
    stdin as `sys.stdin is None`, which the source reports in one line."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; a closed pipe would print a second error there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


main.add_command(usage)
main.add_command(keys)


@main.command()
def tokenizers() -> None:
    """List the tokenizers --tokenizer takes, and what each counts (all offline)."""
    print_tokenizers()


__all__ = ["EXIT_CODES", "EXIT_USAGE", "main"]
