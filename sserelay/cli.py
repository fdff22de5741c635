"""The `sserelay` command: click options in, one run, a bill out, a documented exit code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import click

from . import __version__
from .formats import PAYLOAD_KINDS

if TYPE_CHECKING:
    from rich.console import Console

    from .app import StreamSession
    from .hub import Hub
    from .meter import Bill, ClientMeter, Meter
    from .mock import Text
    from .pacing import Pacer
    from .prices import PriceList
    from .recorder import Recorder
    from .tokens import Tokenizer
    from .upstream import Upstream

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
  6    slow_client: the last client fell too far behind (--max-lag) and was cut off
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


def _serve_options(command: F) -> F:
    """The options of `serve` only: chunking, pacing, the hub, access."""
    from .chunking import CHUNK_MODES
    from .hub import DEFAULT_HISTORY, DEFAULT_MAX_LAG

    options = [
        click.option(
            "--chunk",
            type=click.Choice(CHUNK_MODES),
            default="line",
            show_default=True,
            envvar="SSERELAY_CHUNK",
            help="One event per line, per word (with the whitespace before it, like model "
            "deltas), or per read as it arrives (raw).",
        ),
        click.option(
            "--rate",
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            envvar="SSERELAY_RATE",
            metavar="TOKENS_PER_S",
            help="Pace the stream: each event waits for its tokens at this many tokens/s.",
        ),
        click.option(
            "--delay",
            type=click.FloatRange(min=0),
            default=0.0,
            envvar="SSERELAY_DELAY",
            metavar="SECONDS",
            help="Pace the stream: wait this long between events.",
        ),
        click.option(
            "--realtime",
            is_flag=True,
            envvar="SSERELAY_REALTIME",
            help="Replay a recorded source with its recorded timing (plain text has none).",
        ),
        click.option(
            "--keep",
            is_flag=True,
            envvar="SSERELAY_KEEP",
            help="Serve until Ctrl-C: later clients get the history; the source is paused "
            "while no client listens.",
        ),
        click.option(
            "--history",
            type=click.IntRange(min=0),
            default=DEFAULT_HISTORY,
            show_default=True,
            envvar="SSERELAY_HISTORY",
            metavar="EVENTS",
            help="Keep the last EVENTS events for late clients and Last-Event-ID resumes.",
        ),
        click.option(
            "--max-lag",
            type=click.IntRange(min=1),
            default=None,
            envvar="SSERELAY_MAX_LAG",
            metavar="EVENTS",
            help=f"Cut off (slow_client) a client more than EVENTS events behind the newest "
            f"[default: {DEFAULT_MAX_LAG} or --history, if larger].",
        ),
        click.option(
            "--max-clients",
            type=click.IntRange(min=1),
            default=None,
            envvar="SSERELAY_MAX_CLIENTS",
            metavar="N",
            help="At most N clients at once; more get 503.",
        ),
        click.option(
            "--auth-token",
            default=None,
            envvar="SSERELAY_AUTH_TOKEN",
            metavar="TOKEN",
            help="Clients must send 'Authorization: Bearer TOKEN' or ?token=TOKEN, else 401.",
        ),
        click.option(
            "--cors-origin",
            default=None,
            envvar="SSERELAY_CORS_ORIGIN",
            metavar="ORIGIN",
            help="Allow pages from ORIGIN (or *) to read the stream (Access-Control-Allow-Origin).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _mock_options(command: F) -> F:
    """The options of `serve` as a mock LLM endpoint."""
    from .providers import PROVIDERS

    command = click.option(
        "--once",
        is_flag=True,
        envvar="SSERELAY_ONCE",
        help="With --as: exit when the first completion request ends, with its bill and code.",
    )(command)
    return click.option(
        "--as",
        "provider",
        type=click.Choice(PROVIDERS),
        default=None,
        envvar="SSERELAY_AS",
        help="Be a mock LLM API: answer the provider's completion requests (and its SDK) "
        "with SOURCE's text, streamed or whole, each request anew, until Ctrl-C.",
    )(command)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("source", required=False, default="-", metavar="[SOURCE]")
@_serve_options
@_mock_options
@_common_options
def serve(
    source: str,
    provider: str | None,
    once: bool,
    chunk: str,
    rate: float | None,
    delay: float,
    realtime: bool,
    keep: bool,
    history: int,
    max_lag: int | None,
    max_clients: int | None,
    auth_token: str | None,
    cors_origin: str | None,
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

    Each line (or word, or read: --chunk) becomes one event the moment it is
    read. Every client that connects to / (or /events) gets the stream: the
    source is read once, and a client that connects late, or comes back with
    Last-Event-ID (or ?last_event_id=), first gets the events it missed from
    the history. When the stream has ended and every client has finished, or
    the last client leaves before the end, the bill is printed on stdout and
    sserelay exits; with --keep it serves until Ctrl-C. /ui is a live page.

    \b
    Example:
      cat tokens.txt | sserelay serve --port 8000
      curl -N http://127.0.0.1:8000/
    """
    from rich.console import Console

    from .app import Access, StreamSession, ui_page
    from .errors import SourceError
    from .hub import DEFAULT_MAX_LAG, Hub
    from .pacing import Pacer
    from .replay import RecordingSource

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    counter = _get_tokenizer(tokenizer)
    if once and provider is None:
        raise click.UsageError("--once goes with --as (a plain stream ends by itself)")
    if max_lag is None:
        max_lag = max(DEFAULT_MAX_LAG, history)
    elif max_lag < history:
        raise click.BadParameter(
            f"{max_lag} is less than --history {history}: a client replaying the history "
            "starts that far behind",
            param_hint="'--max-lag'",
        )
    if realtime and (rate is not None or delay):
        raise click.UsageError("--realtime replays the recorded timing: drop --rate and --delay")
    if provider is not None:
        mock_run = _mock_run(
            console,
            source,
            chunk,
            provider,
            counter,
            price,
            quiet,
            partial(Pacer, rate=rate, delay=delay, realtime=realtime),
            heartbeat=heartbeat or None,
            once=once,
        )
        bill, error, signum = mock_run.start(host, port)
        _finish(console, bill, error, signum, as_json)
    if auth_token is not None and not auth_token.strip():
        raise click.BadParameter("the token is empty", param_hint="'--auth-token'")
    try:
        text_source = _open_source(source, chunk)
    except SourceError as exc:
        _fail(console, str(exc), EXIT_CODES["input_error"])
    if realtime and not text_source.timed:
        raise click.UsageError(
            f"--realtime replays a recording's timing; {text_source.name} is plain text, "
            "which has none"
        )
    # A line is whole, so it is counted alone; words and raw reads are pieces
    # of one text, counted over the joined text (a word split in two is one token).
    count = counter.count if chunk == "line" else counter.counter().feed
    # How /ui reads the events: the events are the text, unless they replay a provider's payloads.
    payloads = ""
    count_end: Callable[[], int] | None = None
    if isinstance(text_source, RecordingSource):
        payloads = text_source.payloads
        replay_count = _ReplayCount(counter, payloads)
        count, count_end = replay_count.feed, replay_count.flush
    run = _ServeRun(
        console,
        counter,
        price,
        quiet,
        hub=partial(
            Hub,
            text_source,
            count=count,
            count_end=count_end,
            ids=not no_ids,
            history=history,
            max_lag=max_lag,
            pacer=Pacer(rate=rate, delay=delay, realtime=realtime),
        ),
        session=partial(
            StreamSession,
            heartbeat=heartbeat or None,
            keep=keep,
            access=Access(token=auth_token, max_clients=max_clients, cors_origin=cors_origin),
        ),
        ui=ui_page(tokenizer=counter.name, chunk=chunk, payloads=payloads),
    )
    bill, error, signum = run.start(host, port)
    _finish(console, bill, error, signum, as_json)


class _Endpoint(Protocol):
    """What a run serves (StreamSession, Mock, Proxy): it ends the run by setting
    `finished`, with the run's reason and error; interrupt() is Ctrl-C or SIGTERM."""

    finished: asyncio.Event
    reason: str | None
    error: str | None

    def interrupt(self) -> None: ...


@dataclass
class _Run:
    """The life cycle every command's run shares: listen, serve the endpoint
    until it finishes or a signal ends it, with the live counter on stderr, and
    end with the bill, the run's error and the signal that ended it (if one did).

    A subclass says what it serves (`_serving`) and what it prints under
    `serving on URL` (`_notes`). An endpoint that bills each request on its own
    (a RequestEndpoint) gets a live row per request in flight."""

    console: Console
    tokenizer: Tokenizer
    price: float | None
    quiet: bool

    def start(self, host: str, port: int) -> tuple[Bill, str | None, int | None]:
        from .server import ListenError, listen, run_event_loop

        try:
            sock = listen(host, port)
        except ListenError as exc:
            _fail(self.console, str(exc), EXIT_ERROR)
        try:
            return run_event_loop(self._run(sock))
        except KeyboardInterrupt:  # a Ctrl-C before the loop's handlers were in place
            sys.exit(EXIT_CODES["interrupted"])

    async def _run(self, sock: socket.socket) -> tuple[Bill, str | None, int | None]:
        from .asgi import RequestEndpoint
        from .display import LiveCounter
        from .meter import Meter
        from .server import bound_address, serve_app

        meter = Meter(self.tokenizer.name, self.price)
        signals: list[int] = []
        async with self._serving(meter) as (endpoint, app):
            rows = (
                partial(_active_requests, meter) if isinstance(endpoint, RequestEndpoint) else None
            )
            live = LiveCounter(self.console, meter.totals, quiet=self.quiet, rows=rows)

            def on_signal(signum: int) -> None:
                signals.append(signum)
                endpoint.interrupt()

            def on_ready() -> None:
                url = bound_address(sock).url
                for line in [f"serving on {url}", *self._notes(url)]:
                    self.console.print(f"sserelay: {line}", highlight=False, markup=False)
                live.start()

            try:
                await serve_app(
                    app, sock, finished=endpoint.finished, on_signal=on_signal, on_ready=on_ready
                )
            finally:
                await live.stop()
        bill = meter.bill(endpoint.reason or "interrupted")
        return bill, endpoint.error, signals[0] if signals else None

    def _serving(self, meter: Meter) -> AbstractAsyncContextManager[tuple[_Endpoint, Any]]:
        """The endpoint, billing on `meter`, and the ASGI app that serves it;
        what the run holds is released on the way out, after the server stops."""
        raise NotImplementedError

    def _notes(self, url: str) -> list[str]:
        """What the run says under `serving on URL`, one line each."""
        return []


def _active_requests(meter: Meter) -> list[str]:
    """A live row for each request in flight, the first eight of them."""
    from .display import format_active

    now = time.monotonic()
    active = [format_active(c, now) for c in meter.clients if c.active]
    return active[:8] + ([f"... and {len(active) - 8} more"] if len(active) > 8 else [])


@dataclass(kw_only=True)
class _RequestRun(_Run):
    """A run that bills each request on its own (serve --as, proxy): a receipt
    is printed as each ends; with `once` the first to end ends the run."""

    once: bool

    def _receipt(self, client: ClientMeter, error: str | None) -> None:
        """The line printed as a billed request ends."""
        from .display import format_receipt

        if self.quiet:
            return
        # With --once the request's error is the run's, printed as `sserelay: error:`; not twice.
        receipt = format_receipt(
            client.bill(time.monotonic(), self.price), None if self.once else error
        )
        self.console.print(f"sserelay: {receipt}", highlight=False, markup=False)


@dataclass(kw_only=True)
class _ServeRun(_Run):
    """`serve`: one hub over the source, broadcast to every client, and /ui."""

    #: the hub over the source, not yet reading it
    hub: Callable[[], Hub]
    #: the session that serves the hub, billing on the meter
    session: Callable[[Hub, Meter], StreamSession]
    #: the /ui page
    ui: str

    @contextlib.asynccontextmanager
    async def _serving(self, meter: Meter) -> AsyncIterator[tuple[_Endpoint, Any]]:
        import os

        from .app import create_app

        hub = self.hub()
        session = self.session(hub, meter)
        if os.environ.get("SSERELAY_DEBUG_TASKS") == "1":
            # For the leak tests only; not an option, not documented to users.
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._print_tasks)
        try:
            yield session, create_app(session, ui=self.ui)
        finally:
            await hub.aclose()

    def _print_tasks(self) -> None:
        count = len(asyncio.all_tasks())
        self.console.print(f"sserelay: debug: {count} tasks", highlight=False)


def _open_source(source: str, chunk: str) -> Any:
    """A recording (its first line says so) to replay, else the text of SOURCE."""
    from .replay import RecordingSource, looks_like_recording
    from .sources import TextSource

    if looks_like_recording(source):
        return RecordingSource(source)
    return TextSource(source, chunk)


class _ReplayCount:
    """Tokens of replayed events, over the joined text inside their payloads (/ui counts
    so); `flush()` at the end of the stream counts a last NDJSON line with no line end."""

    def __init__(self, tokenizer: Tokenizer, payloads: str) -> None:
        from .replay import ReplayText

        self._text = ReplayText(payloads)
        self._counter = tokenizer.counter()

    def feed(self, data: str) -> int:
        return self._counter.feed(self._text.feed(data))

    def flush(self) -> int:
        return self._counter.feed(self._text.flush())


def _mock_run(
    console: Console,
    source: str,
    chunk: str,
    provider: str,
    tokenizer: Tokenizer,
    price: float | None,
    quiet: bool,
    pacer: Callable[[], Pacer],
    *,
    heartbeat: float | None,
    once: bool,
) -> _MockRun:
    """The `serve --as` run: a file (or recording) is read anew for each request,
    stdin (or a pipe, a FIFO) once and kept; each request is paced on its own, by a
    new `pacer()`."""
    from .errors import SourceError
    from .mock import FileText, SharedText
    from .replay import RecordingSource, looks_like_recording
    from .sources import TextSource

    recording = looks_like_recording(source)

    def open_source() -> Any:
        if recording:
            return RecordingSource(source, as_text=True)
        return TextSource(source, chunk)

    try:
        first = open_source()  # opened now: a missing file fails before the start
    except SourceError as exc:
        _fail(console, str(exc), EXIT_CODES["input_error"])
    pacing = pacer()  # each request gets its own; this one only says how they are paced
    if pacing.realtime and not recording:
        raise click.UsageError(
            f"--realtime replays a recording's timing; {first.name} is plain text, which has none"
        )
    text: Text
    if not recording and not first.rereadable:  # stdin, a pipe, a FIFO: read once and kept
        text = SharedText(first)
    else:
        sources = iter([first])
        text = FileText(lambda: next(sources, None) or open_source())
    return _MockRun(
        console,
        tokenizer,
        price,
        quiet,
        provider=provider,
        text=text,
        line_ends=chunk == "line" and not recording,
        pacer=pacer if pacing.active else None,
        heartbeat=heartbeat,
        once=once,
    )


@dataclass(kw_only=True)
class _MockRun(_RequestRun):
    """`serve --as PROVIDER`: the provider's API, mocked; each request is billed on its own."""

    provider: str
    text: Text
    line_ends: bool
    pacer: Callable[[], Pacer] | None
    heartbeat: float | None

    @contextlib.asynccontextmanager
    async def _serving(self, meter: Meter) -> AsyncIterator[tuple[_Endpoint, Any]]:
        from .mock import Mock, SharedText, create_mock_app

        mock = Mock(
            self.provider,
            self.text,
            meter,
            tokenizer=self.tokenizer,
            line_ends=self.line_ends,
            pacer=self.pacer,
            heartbeat=self.heartbeat,
            once=self.once,
            on_finished=self._receipt,
        )
        try:
            yield mock, create_mock_app(mock)
        finally:
            if isinstance(self.text, SharedText):
                await self.text.aclose()

    def _notes(self, url: str) -> list[str]:
        from .mock import COMPLETION_PATHS

        path = COMPLETION_PATHS[self.provider]
        return [f"mock {self.provider} API at POST {url.rstrip('/')}{path}"]


class _HeaderLines(click.types.StringParamType):
    """Headers as `'Name: value'`; several in SSERELAY_UPSTREAM_HEADER go one per line."""

    name = "header"
    envvar_list_splitter = "\n"


def _parse_headers(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, str]]:
    from .upstream import parse_header

    headers = []
    for value in values:
        if not value.strip():
            continue
        try:
            headers.append(parse_header(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return headers


@main.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--upstream",
    required=True,
    envvar="SSERELAY_UPSTREAM",
    metavar="URL",
    help="The streaming upstream; a request for /PATH goes to URL/PATH, for / to URL itself.",
)
@click.option(
    "--upstream-header",
    "upstream_headers",
    multiple=True,
    type=_HeaderLines(),
    callback=_parse_headers,
    envvar="SSERELAY_UPSTREAM_HEADER",
    metavar="'NAME: VALUE'",
    help="Add this header to every upstream request (e.g. the API key); repeatable. Never printed.",
)
@click.option(
    "--payload",
    type=click.Choice(PAYLOAD_KINDS),
    default="auto",
    show_default=True,
    envvar="SSERELAY_PAYLOAD",
    help="How to find the text (and usage) in the upstream's payloads.",
)
@click.option(
    "--keep-comments",
    is_flag=True,
    envvar="SSERELAY_KEEP_COMMENTS",
    help="Relay the upstream's SSE comment lines (dropped by default).",
)
@click.option(
    "--include-usage",
    is_flag=True,
    envvar="SSERELAY_INCLUDE_USAGE",
    help="Ask OpenAI-style chat upstreams for usage (stream_options.include_usage); "
    "the extra usage chunk is kept from clients that did not ask for it.",
)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    default=None,
    envvar="SSERELAY_PRICES",
    metavar="FILE",
    help="TOML price list: [MODEL] input = ..., output = ... (per 1M tokens).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    envvar="SSERELAY_CONNECT_TIMEOUT",
    metavar="SECONDS",
    help="Give up on an upstream that does not accept the connection this fast.",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    envvar="SSERELAY_READ_TIMEOUT",
    metavar="SECONDS",
    help="Give up on an upstream that sends nothing for this long.",
)
@click.option(
    "--once",
    is_flag=True,
    envvar="SSERELAY_ONCE",
    help="Exit when the first proxied request ends, with its bill and exit code.",
)
@click.option(
    "--record",
    "record_file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    envvar="SSERELAY_RECORD",
    metavar="FILE",
    help="Record the first request's answer, as relayed, to FILE (JSON Lines with the time of "
    "each event, written as it goes); `sserelay serve FILE` replays it.",
)
@_common_options
def proxy(
    upstream: str,
    upstream_headers: list[tuple[str, str]],
    payload: str,
    keep_comments: bool,
    include_usage: bool,
    prices_file: str | None,
    connect_timeout: float,
    read_timeout: float,
    once: bool,
    record_file: str | None,
    host: str,
    port: int,
    as_json: bool,
    quiet: bool,
    tokenizer: str,
    price: float | None,
    heartbeat: float,
    no_ids: bool,
) -> None:
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
    from rich.console import Console

    from .prices import PriceList, PriceListError
    from .upstream import Timeouts, Upstream

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    counter = _get_tokenizer(tokenizer)
    price_list = None
    if prices_file is not None:
        try:
            with open(prices_file, encoding="utf-8") as file:
                price_list = PriceList.from_toml(file.read())
        except (OSError, UnicodeDecodeError, PriceListError) as exc:
            raise click.BadParameter(f"{prices_file}: {exc}", param_hint="'--prices'") from None
    try:
        target = Upstream(
            upstream,
            headers=upstream_headers,
            timeouts=Timeouts(connect=connect_timeout, read=read_timeout),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--upstream'") from None
    recorder = None
    if record_file is not None:
        from .recorder import Recorder

        try:
            recorder = Recorder(record_file)
        except OSError as exc:
            _fail(console, f"cannot write {record_file}: {exc.strerror or exc}", EXIT_ERROR)
    run = _ProxyRun(
        console,
        counter,
        price,
        quiet,
        upstream=target,
        prices=price_list,
        payload=payload,
        keep_comments=keep_comments,
        include_usage=include_usage,
        heartbeat=heartbeat or None,
        once=once,
        recorder=recorder,
    )
    try:
        bill, error, signum = run.start(host, port)
    finally:
        if recorder is not None:
            recorder.close()
    if recorder is not None and recorder.error is not None:
        console.print(f"sserelay: warning: {recorder.error}", highlight=False, markup=False)
    _finish(console, bill, error, signum, as_json)


@dataclass(kw_only=True)
class _ProxyRun(_RequestRun):
    """`proxy`: each request forwarded to the upstream, relayed and billed on its own."""

    upstream: Upstream
    prices: PriceList | None
    payload: str
    keep_comments: bool
    include_usage: bool
    heartbeat: float | None
    recorder: Recorder | None

    @contextlib.asynccontextmanager
    async def _serving(self, meter: Meter) -> AsyncIterator[tuple[_Endpoint, Any]]:
        from .proxy import Proxy, create_proxy_app

        proxy = Proxy(
            self.upstream,
            meter,
            tokenizer=self.tokenizer,
            payload=self.payload,
            keep_comments=self.keep_comments,
            include_usage=self.include_usage,
            heartbeat=self.heartbeat,
            prices=self.prices,
            once=self.once,
            on_finished=self._receipt,
            recorder=self.recorder,
        )
        try:
            yield proxy, create_proxy_app(proxy)
        finally:
            await self.upstream.aclose()

    def _notes(self, url: str) -> list[str]:
        notes = [f"proxying to {self.upstream.display}"]
        if self.recorder is not None:
            notes.append(f"recording the first request to {self.recorder.path}")
        return notes


def _get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer `--tokenizer NAME` names; a usage error lists the known ones."""
    from .tokens import get_tokenizer

    try:
        return get_tokenizer(name)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="'--tokenizer'") from None


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
