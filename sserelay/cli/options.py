"""The command-line options: one table per command, each option also read from SSERELAY_<NAME>.

The exit codes live here too: documented in `--help`, README.md and man/sserelay.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

from sserelay.metering.reason import Reason
from sserelay.metering.tokens import tokenizer_names
from sserelay.providers.answers import PROVIDERS
from sserelay.providers.payloads import PAYLOAD_KINDS
from sserelay.record.format import AS_RECORDED
from sserelay.streaming.hub import DEFAULT_LINGER, DEFAULT_MAX_LAG
from sserelay.streaming.log import DEFAULT_HISTORY
from sserelay.wire.chunking import CHUNK_MODES

#: Exit codes: a reason's, or one of these.
EXIT_COMPLETE = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SIGTERM = 143
EXIT_CODES = {
    Reason.COMPLETE.value: EXIT_COMPLETE,
    Reason.CLIENT_DISCONNECTED.value: 3,
    Reason.UPSTREAM_ERROR.value: 4,
    Reason.INPUT_ERROR.value: 5,
    Reason.SLOW_CLIENT.value: 6,
    Reason.INTERRUPTED.value: 130,
}

EXIT_CODES_HELP = """\b
Exit codes:
  0    complete: the stream ended and every client got all of it
  1    error: could not start (port in use, bad address) or write the bill
  2    usage error
  3    client_disconnected: the client went away before the end
  4    upstream_error: the upstream failed
  5    input_error: the input could not be read, or its command failed
  6    slow_client: the last client fell too far behind (--max-lag) and was cut off
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM
"""

F = TypeVar("F", bound=Callable[..., Any])

#: What each tokenizer counts (without loading a vocabulary to ask it).
TOKENIZERS = {
    "auto": "the request's model's encoding: o200k_base for gpt-4o, gpt-4.1, gpt-5, o1-o4; "
    "cl100k_base for gpt-4, gpt-3.5; o200k_base as an estimate for any other model",
    "whitespace": "whitespace-delimited words (len(text.split()))",
    "chars": "Unicode code points",
    "o200k_base": "OpenAI's BPE of gpt-4o, gpt-4.1, gpt-5 and o1-o4 (offline)",
    "cl100k_base": "OpenAI's BPE of gpt-4 and gpt-3.5 (offline)",
}


def print_tokenizers() -> None:
    """What `sserelay tokenizers` (and `--tokenizer list`) prints: a name and what it counts."""
    for name in tokenizer_names():
        click.echo(f"{name:<12} {TOKENIZERS.get(name, '')}".rstrip())


def _tokenizer_list(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value == "list":
        print_tokenizers()
        ctx.exit(0)
    return value


class Finite(click.ParamType[float, Any]):
    """A finite number in a range: click's FloatRange lets `nan` and `inf` through."""

    name = "number"

    def __init__(self, low: float = 0.0, *, open_low: bool = False) -> None:
        self.low = low
        self.open_low = open_low

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number < self.low or (self.open_low and number == self.low):
            relation = "over" if self.open_low else "at least"
            self.fail(f"{number:g} is not {relation} {self.low:g}", param, ctx)
        return number


class HeaderLines(click.types.StringParamType):
    """Headers as `'Name: value'`; several in SSERELAY_UPSTREAM_HEADER go one per line."""

    name = "header"
    envvar_list_splitter = "\n"


def parse_headers(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    from sserelay.sources.upstream import parse_header  # httpx: not for --version

    headers = []
    for value in values:
        if not value.strip():
            continue
        try:
            headers.append(parse_header(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return tuple(headers)


class EnvOption(click.Option):
    """An option also read from its SSERELAY_* variable; a bad value that came from the
    variable is said to, naming it (`SSERELAY_PORT=abc`, not `--port`)."""

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as exc:
            source = ctx.get_parameter_source(self.name or "")
            if source is click.core.ParameterSource.ENVIRONMENT and isinstance(self.envvar, str):
                exc.param_hint = f"{self.envvar} (from the environment)"
            raise


def option(*decls: str, env: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option read from SSERELAY_<env> too (its --help says so)."""
    return click.option(*decls, envvar=f"SSERELAY_{env}", show_envvar=True, cls=EnvOption, **kwargs)


def apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(command: F) -> F:
        for add in reversed(options):
            command = add(command)
        return command

    return decorate


common_options = apply(
    [
        option("--host", env="HOST", default="127.0.0.1", show_default=True,
               metavar="ADDRESS", help="Address to listen on."),
        option("--port", env="PORT", default=8000, show_default=True, metavar="PORT",
               type=click.IntRange(0, 65535), help="Port to listen on; 0 picks a free one."),
        option("--json", "as_json", env="JSON", is_flag=True,
               help="Print the bill as one JSON object."),
        option("--quiet", "-q", env="QUIET", is_flag=True,
               help="No live view on stderr (receipts stay: --no-receipts)."),
        option("--no-receipts", env="NO_RECEIPTS", is_flag=True,
               help="No receipt line on stderr as each request ends (serve --as, proxy)."),
        option("--tokenizer", env="TOKENIZER", metavar="NAME",
               type=click.Choice([*tokenizer_names(), "list"]), callback=_tokenizer_list,
               help="How tokens are counted: whitespace (words), chars, o200k_base or "
               "cl100k_base (OpenAI's BPE, offline), or auto (the request's model's "
               "encoding) [default: whitespace for serve, auto for proxy and serve --as]."),
        option("--price", env="PRICE", type=Finite(), metavar="AMOUNT",
               help="Price per 1M tokens; the bill then shows the cost."),
        option("--heartbeat", env="HEARTBEAT", type=Finite(), default=15.0, show_default=True,
               metavar="SECONDS",
               help="Send a ': ping' comment on a stream idle this long; 0 turns it off."),
        option("--no-ids", env="NO_IDS", is_flag=True,
               help="Do not number events with an id: field."),
        option("--auth-token", env="AUTH_TOKEN", metavar="TOKEN",
               help="Clients must present TOKEN ('Authorization: Bearer TOKEN', x-api-key, "
               "or ?token=TOKEN), else 401."),
        option("--max-clients", env="MAX_CLIENTS", type=click.IntRange(min=1), metavar="N",
               help="At most N clients (requests) at once; more get 503."),
        option("--cors-origin", env="CORS_ORIGIN", metavar="ORIGIN",
               help="Allow pages from ORIGIN (or *) to call it (Access-Control-Allow-Origin; "
               "preflights answered)."),
        option("--ledger", env="LEDGER", metavar="TARGET",
               help="Keep a usage row per client or request in TARGET: a SQLite path, a "
               "*.jsonl file, or a postgresql:// URL [default for proxy and serve --as: "
               "$XDG_STATE_HOME/sserelay/usage.db]."),
        option("--no-ledger", env="NO_LEDGER", is_flag=True, help="Keep no usage ledger."),
        option("--keys", env="KEYS", metavar="FILE",
               type=click.Path(exists=True, dir_okay=False, readable=True),
               help="A TOML keys file: clients must present a key (Bearer, x-api-key, "
               "?token=); each key may have budgets, a rate limit and a model list, "
               "enforced mid-stream."),
        option("--admin-token", env="ADMIN_TOKEN", metavar="TOKEN",
               help="Serve /metrics, /usage and the dashboard's figures only to requests that "
               "present TOKEN (as --auth-token is presented) [default: loopback clients only]."),
        option("--no-metrics", env="NO_METRICS", is_flag=True,
               help="Serve no /metrics, /usage or dashboard figures (a proxy then forwards "
               "those paths upstream)."),
        option("--checkpoint", env="CHECKPOINT", type=Finite(open_low=True), default=1.0,
               show_default=True, metavar="SECONDS",
               help="Save open rows' figures to the ledger this often (what a crash can lose)."),
        option("--redis", env="REDIS", metavar="URL",
               help="Share keys' budgets and rate limits with every instance on this Redis "
               "(redis://HOST:PORT/DB); serve can publish or follow a topic there."),
        option("--max-line-bytes", env="MAX_LINE_BYTES", type=click.IntRange(min=1),
               default=16 * 1024, show_default=True, metavar="BYTES",
               help="A longer request line gets 414, a longer header line 431."),
        option("--max-head-bytes", env="MAX_HEAD_BYTES", type=click.IntRange(min=1),
               default=64 * 1024, show_default=True, metavar="BYTES",
               help="A longer request head (request line and headers) gets 431."),
        option("--max-headers", env="MAX_HEADERS", type=click.IntRange(min=1), default=100,
               show_default=True, metavar="N", help="More header lines get 431."),
        option("--head-timeout", env="HEAD_TIMEOUT", type=Finite(open_low=True), default=10.0,
               show_default=True, metavar="SECONDS",
               help="Close a connection whose request head is not complete this long after "
               "it began."),
        option("--max-body-bytes", env="MAX_BODY_BYTES", type=click.IntRange(min=1),
               default=64 * 1024 * 1024, show_default=True, metavar="BYTES",
               help="A longer request body (serve --as, proxy) gets 413."),
    ]
)  # fmt: skip

serve_options = apply(
    [
        click.argument("source", required=False, default="-",
                       metavar="[SOURCE | -- CMD [ARGS]...]"),
        option("--chunk", env="CHUNK", type=click.Choice(CHUNK_MODES), default="line",
               show_default=True,
               help="One event per line, per word (with the whitespace before it, like model "
               "deltas), or per read as it arrives (raw)."),
        option("--rate", env="RATE", type=Finite(open_low=True), metavar="TOKENS_PER_S",
               help="Pace the stream: each event waits for its tokens at this many tokens/s."),
        option("--delay", env="DELAY", type=Finite(), default=0.0, metavar="SECONDS",
               help="Pace the stream: wait this long between events."),
        option("--realtime", env="REALTIME", is_flag=True,
               help="Replay a recorded source with its recorded timing (plain text has none)."),
        option("--keep", env="KEEP", is_flag=True,
               help="Serve until Ctrl-C: later clients get the history; the source is paused "
               "while no client listens."),
        option("--linger", env="LINGER", type=Finite(), default=DEFAULT_LINGER, show_default=True,
               metavar="SECONDS",
               help="After the last client left before the end, wait this long for it to "
               "resume (Last-Event-ID) before giving up the stream; 0: at once."),
        option("--history", env="HISTORY", type=click.IntRange(min=0), default=DEFAULT_HISTORY,
               show_default=True, metavar="EVENTS",
               help="Keep the last EVENTS events for late clients and Last-Event-ID resumes."),
        option("--max-lag", env="MAX_LAG", type=click.IntRange(min=1), metavar="EVENTS",
               help=f"Cut off (slow_client) a client more than EVENTS events behind the newest "
               f"[default: {DEFAULT_MAX_LAG} or --history, if larger]."),
        option("--as", "provider", env="AS", type=click.Choice([*PROVIDERS, AS_RECORDED]),
               help="Be a mock LLM API: answer the provider's completion requests (and its "
               "SDK) with SOURCE's text, streamed or whole, each request anew, until Ctrl-C; "
               "a recording's requests each get the text of the exchange they match. "
               "'recorded': replay a recording's exchanges as recorded (status, headers, "
               "bytes), each request the one it matches."),
        option("--once", env="ONCE", is_flag=True,
               help="With --as: exit when the first completion request (with --as recorded, "
               "the first request) ends, with its bill and code."),
        option("--topic", env="TOPIC", metavar="NAME",
               help="With --redis: publish the stream to topic NAME for other instances "
               "(serve --follow NAME) and serve it from there; ids are the topic's, so a "
               "client resumes on any instance."),
        option("--follow", env="FOLLOW", metavar="NAME",
               help="With --redis: serve topic NAME, published by another instance (no "
               "SOURCE), until Ctrl-C."),
    ]
)  # fmt: skip

proxy_options = apply(
    [
        option("--upstream", env="UPSTREAM", required=True, metavar="URL",
               help="The streaming upstream; a request for /PATH goes to URL/PATH, for / to "
               "URL itself."),
        option("--upstream-header", "upstream_headers", env="UPSTREAM_HEADER", multiple=True,
               type=HeaderLines(), callback=parse_headers, metavar="'NAME: VALUE'",
               help="Add this header to every upstream request (e.g. the API key); "
               "repeatable. Never printed."),
        option("--payload", env="PAYLOAD", type=click.Choice(PAYLOAD_KINDS), default="auto",
               show_default=True, help="How to find the text (and usage) in the upstream's "
               "payloads."),
        option("--keep-comments", env="KEEP_COMMENTS", is_flag=True,
               help="Relay the upstream's SSE comment lines (dropped by default)."),
        option("--include-usage", env="INCLUDE_USAGE", is_flag=True,
               help="Ask OpenAI-style chat upstreams for usage (stream_options.include_usage); "
               "the extra usage chunk is kept from clients that did not ask for it."),
        option("--prices", env="PRICES", metavar="FILE",
               type=click.Path(exists=True, dir_okay=False, readable=True),
               help="TOML price list: [MODEL] input = ..., output = ... (per 1M tokens)."),
        option("--connect-timeout", env="CONNECT_TIMEOUT", type=Finite(open_low=True),
               default=10.0, show_default=True, metavar="SECONDS",
               help="Give up on an upstream that does not accept the connection this fast."),
        option("--read-timeout", env="READ_TIMEOUT", type=Finite(open_low=True), default=300.0,
               show_default=True, metavar="SECONDS",
               help="Give up on an upstream that sends nothing for this long."),
        option("--once", env="ONCE", is_flag=True,
               help="Exit when the first proxied request ends, with its bill and exit code."),
        option("--record", env="RECORD", metavar="FILE",
               type=click.Path(dir_okay=False, writable=True),
               help="Record every exchange (request, answer as relayed, the time of each "
               "event) to FILE, JSON Lines written as it goes; `sserelay serve FILE --as "
               "recorded` replays them. An existing FILE is refused unless --force or --append."),
        option("--force", env="FORCE", is_flag=True,
               help="With --record: overwrite FILE if it exists."),
        option("--append", env="APPEND", is_flag=True,
               help="With --record: add the exchanges to FILE if it exists."),
    ]
)  # fmt: skip

#: The option that sets each config field, where it is not `--field-name`.
OPTION_OF_FIELD = {
    "provider": "--as",
    "source": "SOURCE",
    "command": "CMD",
    "upstream_headers": "--upstream-header",
    "line_bytes": "--max-line-bytes",
    "head_bytes": "--max-head-bytes",
    "headers": "--max-headers",
    "body_bytes": "--max-body-bytes",
}


class CommandAfterDashes(click.Command):
    """A command whose arguments after the first `--` are a program to run and its own
    arguments (`serve -- CMD ARGS...`), put in the `command` parameter as a tuple:
    click alone would hand the program's name to SOURCE."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        command: tuple[str, ...] = ()
        if "--" in args:
            at = args.index("--")
            args, command = args[:at], tuple(args[at + 1 :])
            if not command:
                raise click.UsageError("-- is followed by nothing: give the command to run", ctx)
        rest = super().parse_args(ctx, args)
        ctx.params["command"] = command
        return rest


def option_of(field: str | None) -> str | None:
    """The command-line option that sets a config field."""
    if field is None:
        return None
    return OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
