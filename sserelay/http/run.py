"""`run(config) -> RunResult`: the one library entry. The CLI is its user.

A run opens what it serves (the source, the upstream, a recording), listens, serves until
its endpoint finishes (the stream ended, the one request of `--once` ended, a signal or
`Running.stop()`), and returns the bill with the run's error and the signal that ended it.
Everything that can fail before the first client (a bad setting, a missing file, a port in
use) raises an SSERelayError before listening. Observers (sserelay.metering.MeterObserver)
hear of every client as it opens, writes and closes: receipts, a ledger, metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sserelay.errors import ConfigError, OutputError
from sserelay.http.config import Config, MockConfig, ProxyConfig, ServeConfig
from sserelay.http.endpoint import Endpoint
from sserelay.http.mock_app import COMPLETION_PATHS, Mock, create_mock_app
from sserelay.http.proxy_app import Proxy, create_proxy_app
from sserelay.http.server import bound_address, listen, serve_app
from sserelay.http.stream_app import StreamSession, create_app, ui_page
from sserelay.ledger import new_instance_id, open_ledger
from sserelay.ledger.writer import LedgerWriter
from sserelay.metering.bill import Bill, ClientBill, Totals
from sserelay.metering.meter import MAX_BILL_ROWS, ClientMeter, Meter, MeterObserver
from sserelay.metering.pricing import PriceList, Pricing
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import TokenCounter, Tokenizer, tokenizer_for
from sserelay.record.recorder import Recorder
from sserelay.record.replay import RecordingSource, ReplayCount, looks_like_recording
from sserelay.secrecy import Redactor
from sserelay.sources.command import CommandSource
from sserelay.sources.pacing import Pacer
from sserelay.sources.shared import FileText, SharedText
from sserelay.sources.text import TextSource
from sserelay.sources.upstream import Timeouts, Upstream
from sserelay.streaming.hub import Hub

#: An instance whose heartbeat is this old (seconds), or 5 checkpoints if longer, is dead:
#: a run that opens the ledger closes its open rows as `crashed`.
DEAD_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: its bill, its error (one line, secrets masked; None if it had none)
    and the signal that ended it (None if none did)."""

    bill: Bill
    error: str | None = None
    signal: int | None = None
    #: What went wrong on the side without ending the run (a recording that could not be
    #: written, a ledger row kept elsewhere), one line each.
    warnings: tuple[str, ...] = ()
    #: The ledger that holds the run's rows (its display: no password), if there was one.
    ledger: str | None = None
    #: Rows the ledger could not store (they are in a fallback file a warning names).
    unwritten: int = 0

    @property
    def reason(self) -> Reason:
        return self.bill.reason


class Running:
    """A run that is listening, as `on_ready` sees it: its URL, what it serves (`notes`,
    one line each), live figures, and `stop()` (what Ctrl-C does)."""

    def __init__(
        self,
        url: str,
        notes: list[str],
        meter: Meter,
        endpoint: Endpoint,
        ledger: str | None = None,
    ) -> None:
        self.url = url
        self.notes = notes
        #: the ledger that keeps the run's rows (its display: no password), if any
        self.ledger = ledger
        self._meter = meter
        self._endpoint = endpoint
        #: whether each client is a request with its own receipt (`serve --as`, `proxy`)
        self.per_request = not isinstance(endpoint, StreamSession)

    def totals(self) -> Totals:
        return self._meter.totals()

    def active(self) -> list[ClientMeter]:
        """The clients being served now."""
        return [client for client in self._meter.clients if client.active]

    def now(self) -> float:
        return self._meter.now()

    def stop(self) -> None:
        """End every open stream cleanly and finish the run (as Ctrl-C does)."""
        self._endpoint.interrupt()


async def run(
    config: Config,
    *,
    observers: Sequence[MeterObserver] = (),
    on_ready: Callable[[Running], None] | None = None,
    handle_signals: bool = True,
    sock: socket.socket | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> RunResult:
    """Run `config` until it is over; see the module docstring. With `handle_signals`,
    SIGINT and SIGTERM stop the run (a second one stops it at once); `sock` is a listening
    socket to serve on instead of one bound to the config's host and port; `on_warning`
    hears at once of what goes wrong on the side (a ledger lost and back), which the
    result's `warnings` also hold."""
    tokenizer = _tokenizer(config.tokenizer)
    pricing = Pricing(config.price, _price_list(config))
    once = isinstance(config, MockConfig | ProxyConfig) and config.once
    meter = Meter(config.tokenizer, pricing=pricing, keep_rows=None if once else MAX_BILL_ROWS)
    for observer in observers:
        meter.subscribe(observer)
    warnings: list[str] = []
    if pricing.models is not None:
        meter.subscribe(_Unpriced(pricing, warnings, on_warning))
    async with _ledger(config, meter, warnings, on_warning) as ledger:
        endpoint, signals = await _serve_until_done(
            config,
            tokenizer,
            meter,
            warnings,
            on_ready,
            handle_signals,
            sock,
            None if ledger is None else ledger.display,
        )
        bill = meter.bill(endpoint.reason or Reason.INTERRUPTED)
    return RunResult(
        bill,
        endpoint.error,
        signals[0] if signals else None,
        tuple(warnings),
        ledger=None if ledger is None else ledger.display,
        unwritten=0 if ledger is None else ledger.unwritten,
    )


async def _serve_until_done(
    config: Config,
    tokenizer: Tokenizer,
    meter: Meter,
    warnings: list[str],
    on_ready: Callable[[Running], None] | None,
    handle_signals: bool,
    sock: socket.socket | None,
    ledger: str | None,
) -> tuple[Endpoint, list[int]]:
    """Serve `config` until its endpoint finishes; the endpoint and the signals seen."""
    async with _serving(config, tokenizer, meter, warnings) as (endpoint, app, notes):
        if sock is None:
            sock = listen(config.host, config.port)
        signals: list[int] = []

        def on_signal(signum: int) -> None:
            signals.append(signum)
            endpoint.interrupt()

        def ready() -> None:
            if on_ready is not None:
                url = bound_address(sock).url
                said = [note.replace("{url}", url.rstrip("/")) for note in notes]
                on_ready(Running(url, said, meter, endpoint, ledger))

        await serve_app(
            app,
            sock,
            finished=endpoint.finished,
            on_signal=on_signal if handle_signals else None,
            on_ready=ready,
        )
    return endpoint, signals


class _Unpriced(MeterObserver):
    """Says once per model that a price list has no price for it (its requests' cost is
    null, and the bill counts them)."""

    def __init__(
        self, pricing: Pricing, warnings: list[str], on_warning: Callable[[str], None] | None
    ) -> None:
        self._pricing = pricing
        self._warnings = warnings
        self._on_warning = on_warning
        self._said: set[str] = set()

    def closed(self, bill: ClientBill) -> None:
        model = bill.model
        if bill.request is None or bill.cost is not None or model in self._said:
            return
        if len(self._said) < 100:  # a client naming a thousand models gets a hundred lines
            self._said.add(model or "")
            message = (
                f"no price for model {model or '(none named)'} in the price list: its "
                "requests are unpriced (cost null)"
            )
            self._warnings.append(message)
            if self._on_warning is not None:
                self._on_warning(message)


class _LedgerUse:
    """The run's ledger, as run() reports it."""

    def __init__(self, display: str) -> None:
        self.display = display
        self.unwritten = 0


@contextlib.asynccontextmanager
async def _ledger(
    config: Config,
    meter: Meter,
    warnings: list[str],
    on_warning: Callable[[str], None] | None,
) -> AsyncIterator[_LedgerUse | None]:
    """The config's ledger, opened before anything listens (LedgerError if it cannot be),
    with the rows of dead instances closed as `crashed`, written to from the meter's hook
    and closed after the bill: what it could not store is said in `warnings`."""
    if config.ledger is None:
        yield None
        return
    instance = new_instance_id()

    def warn(message: str) -> None:
        # Said now (a lost database must not wait for the exit) and kept for the result.
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    ledger = open_ledger(config.ledger, instance=instance, on_warning=warn)
    await ledger.open()
    use = _LedgerUse(ledger.display)
    dead_after = max(DEAD_AFTER, 5 * config.checkpoint)
    try:
        await ledger.recover(dead_after=dead_after)
        writer = LedgerWriter(
            ledger,
            instance=instance,
            tokenizer=meter.tokenizer,
            checkpoint=config.checkpoint,
            price_of=lambda c: meter.pricing.cost(c.billed_tokens, c.upstream_usage, c.model),
            on_warning=warn,
            dead_after=dead_after,
        )
        meter.subscribe(writer)
        writer.start()
    except BaseException:
        await ledger.close()
        raise
    try:
        yield use
    finally:
        report = await writer.aclose()
        if report.unwritten:
            use.unwritten = report.unwritten
            where = report.fallback_path or "nowhere"
            warnings.append(
                f"ledger {ledger.display}: {report.unwritten} rows could not be stored; "
                f"they are in {where}"
            )
        if report.error:
            warnings.append(f"ledger {ledger.display}: {report.error}")


def _tokenizer(name: str) -> Tokenizer:
    """The run's tokenizer, loaded now (a missing vocabulary package is said before the
    start); for `auto`, the encoding a request without a known model gets."""
    try:
        return tokenizer_for(name)[0]
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]), "tokenizer") from None


def _price_list(config: Config) -> PriceList | None:
    if not isinstance(config, ProxyConfig) or config.prices is None:
        return None
    try:
        with open(config.prices, encoding="utf-8") as file:
            return PriceList.from_toml(file.read())
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{config.prices}: {detail}", "prices") from None


@contextlib.asynccontextmanager
async def _serving(
    config: Config, tokenizer: Tokenizer, meter: Meter, warnings: list[str]
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """The endpoint for `config`, billing on `meter`, its ASGI app, and the lines said under
    `serving on URL`; what it holds is released on the way out, after the server stops,
    with anything that went wrong on the side added to `warnings`."""
    if isinstance(config, ServeConfig):
        serving = _serve(config, tokenizer, meter)
    elif isinstance(config, MockConfig):
        serving = _mock(config, tokenizer, meter)
    else:
        serving = _proxy(config, tokenizer, meter, warnings)
    async with serving as served:
        yield served


def _check_realtime(realtime: bool, name: str, timed: bool) -> None:
    if realtime and not timed:
        raise ConfigError(
            f"--realtime replays a recording's timing; {name} is plain text, which has none",
            "realtime",
        )


@contextlib.asynccontextmanager
async def _serve(
    config: ServeConfig, tokenizer: Tokenizer, meter: Meter
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`serve`: one hub over the source, broadcast to every client, and /ui."""
    source: TextSource | RecordingSource | CommandSource
    if config.command:
        source = CommandSource(config.command, config.chunk)
    elif looks_like_recording(config.source):
        source = RecordingSource(config.source)
    else:
        source = TextSource(config.source, config.chunk)
    _check_realtime(config.realtime, source.name, source.timed)
    async with source:
        async with _serve_source(config, tokenizer, meter, source) as served:
            yield served


@contextlib.asynccontextmanager
async def _serve_source(
    config: ServeConfig,
    tokenizer: Tokenizer,
    meter: Meter,
    source: TextSource | RecordingSource | CommandSource,
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    # A line is whole, so it is counted alone; words and raw reads are pieces of one text,
    # counted over the joined text (a word split in two is one token; a BPE count holds
    # back its open tail, billed at the end or as far as a leaving client got).
    count: Callable[[str], int] = tokenizer.count
    count_end: Callable[[], int] | None = None
    pending: Callable[[], int] | None = None
    # How /ui reads the events: the events are the text, unless they replay a provider's payloads.
    payloads = ""
    if isinstance(source, RecordingSource):
        payloads = source.payloads
        counter: TokenCounter | ReplayCount = ReplayCount(tokenizer, payloads)
    elif config.chunk != "line":
        counter = tokenizer.counter()
    if isinstance(source, RecordingSource) or config.chunk != "line":
        count, count_end = counter.feed, counter.flush
        pending = counter.pending if tokenizer.holds_back else None
    hub = Hub(
        source,
        count=count,
        count_end=count_end,
        pending=pending,
        ids=config.ids,
        history=config.history,
        max_lag=config.lag_limit,
        pacer=Pacer(rate=config.rate, delay=config.delay, realtime=config.realtime),
    )
    session = StreamSession(
        hub, meter, heartbeat=config.heartbeat_s, keep=config.keep, access=config.access
    )
    page = ui_page(tokenizer=tokenizer.name, chunk=config.chunk, payloads=payloads)
    if os.environ.get("SSERELAY_DEBUG_TASKS") == "1":
        # For the leak tests only; not an option, not documented to users.
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _print_tasks)
    notes = (
        [f"running {source.name} (pid {source.pid})"] if isinstance(source, CommandSource) else []
    )
    try:
        yield session, create_app(session, ui=page), notes
    finally:
        await hub.aclose()


def _print_tasks() -> None:
    os.write(2, f"sserelay: debug: {len(asyncio.all_tasks())} tasks\n".encode())


@contextlib.asynccontextmanager
async def _mock(
    config: MockConfig, tokenizer: Tokenizer, meter: Meter
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`serve --as`: a file (or recording) is read anew for each request; stdin, a pipe,
    a FIFO or a command once and kept; each request is paced on its own, by a new Pacer."""
    recording = not config.command and looks_like_recording(config.source)

    def open_source() -> TextSource | RecordingSource | CommandSource:
        if config.command:
            return CommandSource(config.command, config.chunk)
        if recording:
            return RecordingSource(config.source, as_text=True)
        return TextSource(config.source, config.chunk)

    _check_realtime(config.realtime, " ".join(config.command) or config.source, recording)
    async with contextlib.AsyncExitStack() as held:
        first = open_source()
        await held.enter_async_context(first)  # a missing file fails now, before listening
        text: SharedText | FileText
        if recording or first.rereadable:
            await held.aclose()  # it opens; each request opens its own
            text = FileText(open_source)
        else:  # stdin, a pipe, a FIFO, a command: read once and kept, closed at the end
            text = SharedText(first)
            held.push_async_callback(text.aclose)
        line_ends = config.chunk == "line" and not recording
        async with _mock_text(config, tokenizer, meter, text, line_ends) as served:
            yield served


@contextlib.asynccontextmanager
async def _mock_text(
    config: MockConfig,
    tokenizer: Tokenizer,
    meter: Meter,
    text: SharedText | FileText,
    line_ends: bool,
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """The mock over `text`; with `line_ends`, each chunk is a line given back its `\\n`."""
    pacer = partial(Pacer, rate=config.rate, delay=config.delay, realtime=config.realtime)
    mock = Mock(
        config.provider,
        text,
        meter,
        tokenizer=config.tokenizer,
        line_ends=line_ends,
        pacer=pacer if pacer().active else None,
        heartbeat=config.heartbeat_s,
        once=config.once,
        access=config.access,
    )
    path = COMPLETION_PATHS[config.provider]
    yield mock, create_mock_app(mock), [f"mock {config.provider} API at POST {{url}}{path}"]


@contextlib.asynccontextmanager
async def _proxy(
    config: ProxyConfig, tokenizer: Tokenizer, meter: Meter, warnings: list[str]
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`proxy`: each request forwarded to the upstream, relayed and billed on its own."""
    try:
        upstream = Upstream(
            config.upstream,
            headers=config.upstream_headers,
            timeouts=Timeouts(connect=config.connect_timeout, read=config.read_timeout),
        )
    except ValueError as exc:
        raise ConfigError(str(exc), "upstream") from None
    secrets = [*upstream.secrets, *([config.access.token] if config.access.token else [])]
    redactor = Redactor(secrets)
    recorder = None
    notes = [f"proxying to {upstream.display}"]
    if (variable := upstream.ignored_proxy) is not None:
        notes.append(f"{variable} is set but not used: the upstream is reached directly")
    try:
        if config.record is not None:
            try:
                recorder = Recorder(config.record, redactor=redactor)
            except OSError as exc:
                raise OutputError(f"cannot write {config.record}: {exc.strerror or exc}") from None
            notes.append(f"recording the first request to {config.record}")
        proxy = Proxy(
            upstream,
            meter,
            tokenizer=config.tokenizer,
            payload=config.payload,
            keep_comments=config.keep_comments,
            include_usage=config.include_usage,
            heartbeat=config.heartbeat_s,
            once=config.once,
            recorder=recorder,
            access=config.access,
            redactor=redactor,
        )
        yield proxy, create_proxy_app(proxy), notes
    finally:
        await upstream.aclose()
        if recorder is not None:
            recorder.close()
            if recorder.error is not None:
                warnings.append(recorder.error)
