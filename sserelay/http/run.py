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

from sserelay.errors import ConfigError
from sserelay.http.config import Config, MockConfig, ProxyConfig, ServeConfig
from sserelay.http.endpoint import Endpoint
from sserelay.http.mock_app import COMPLETION_PATHS, Mock, create_mock_app
from sserelay.http.proxy_app import Proxy, create_proxy_app
from sserelay.http.replay_app import Player, create_player_app
from sserelay.http.server import bound_address, listen, serve_app
from sserelay.http.stream_app import StreamSession, create_app, ui_page
from sserelay.metering.bill import Bill, Totals
from sserelay.metering.meter import ClientMeter, Meter, MeterObserver
from sserelay.metering.pricing import PriceList, Pricing
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer, get_tokenizer
from sserelay.record.format import AS_RECORDED
from sserelay.record.recorder import Recorder
from sserelay.record.replay import (
    Cassette,
    RecordingSource,
    ReplayCount,
    load_recording,
    looks_like_recording,
)
from sserelay.secrecy import Redactor
from sserelay.sources.pacing import Pacer
from sserelay.sources.shared import FileText, SharedText
from sserelay.sources.text import TextSource
from sserelay.sources.upstream import Timeouts, Upstream
from sserelay.streaming.hub import Hub


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

    @property
    def reason(self) -> Reason:
        return self.bill.reason


class Running:
    """A run that is listening, as `on_ready` sees it: its URL, what it serves (`notes`,
    one line each), live figures, and `stop()` (what Ctrl-C does)."""

    def __init__(self, url: str, notes: list[str], meter: Meter, endpoint: Endpoint) -> None:
        self.url = url
        self.notes = notes
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
) -> RunResult:
    """Run `config` until it is over; see the module docstring. With `handle_signals`,
    SIGINT and SIGTERM stop the run (a second one stops it at once); `sock` is a listening
    socket to serve on instead of one bound to the config's host and port."""
    tokenizer = _tokenizer(config.tokenizer)
    pricing = Pricing(config.price, _price_list(config))
    meter = Meter(tokenizer.name, pricing=pricing)
    for observer in observers:
        meter.subscribe(observer)
    warnings: list[str] = []
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
                on_ready(Running(url, said, meter, endpoint))

        await serve_app(
            app,
            sock,
            finished=endpoint.finished,
            on_signal=on_signal if handle_signals else None,
            on_ready=ready,
        )
    bill = meter.bill(endpoint.reason or Reason.INTERRUPTED)
    return RunResult(bill, endpoint.error, signals[0] if signals else None, tuple(warnings))


def _tokenizer(name: str) -> Tokenizer:
    try:
        return get_tokenizer(name)
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
    source: TextSource | RecordingSource
    if looks_like_recording(config.source):
        source = RecordingSource(config.source)
    else:
        source = TextSource(config.source, config.chunk)
    _check_realtime(config.realtime, source.name, source.timed)
    async with source:
        async with _serve_source(config, tokenizer, meter, source) as served:
            yield served


@contextlib.asynccontextmanager
async def _serve_source(
    config: ServeConfig, tokenizer: Tokenizer, meter: Meter, source: TextSource | RecordingSource
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    # A line is whole, so it is counted alone; words and raw reads are pieces
    # of one text, counted over the joined text (a word split in two is one token).
    count = tokenizer.count if config.chunk == "line" else tokenizer.counter().feed
    # How /ui reads the events: the events are the text, unless they replay a provider's payloads.
    payloads = ""
    count_end = None
    if isinstance(source, RecordingSource):
        payloads = source.payloads
        replay_count = ReplayCount(tokenizer, payloads)
        count, count_end = replay_count.feed, replay_count.flush
    hub = Hub(
        source,
        count=count,
        count_end=count_end,
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
    try:
        yield session, create_app(session, ui=page), []
    finally:
        await hub.aclose()


def _print_tasks() -> None:
    os.write(2, f"sserelay: debug: {len(asyncio.all_tasks())} tasks\n".encode())


@contextlib.asynccontextmanager
async def _mock(
    config: MockConfig, tokenizer: Tokenizer, meter: Meter
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`serve --as`: a recording answers each request with the exchange it matches; a file
    is read anew for each request; stdin, a pipe or a FIFO once and kept; each request is
    paced on its own, by a new Pacer."""
    if looks_like_recording(config.source):
        async with _replay(config, tokenizer, meter) as served:
            yield served
        return
    if config.provider == AS_RECORDED:
        name = "stdin" if config.source in ("", "-") else config.source
        raise ConfigError(f"--as recorded replays a recording; {name} is not one", "provider")

    def open_source() -> TextSource:
        return TextSource(config.source, config.chunk)

    _check_realtime(config.realtime, config.source, False)
    async with contextlib.AsyncExitStack() as held:
        first = open_source()
        await held.enter_async_context(first)  # a missing file fails now, before listening
        text: SharedText | FileText
        if first.rereadable:
            await held.aclose()  # it opens; each request opens its own
            text = FileText(open_source)
        else:  # stdin, a pipe, a FIFO: read once and kept, closed at the end of the run
            text = SharedText(first)
            held.push_async_callback(text.aclose)
        line_ends = config.chunk == "line"
        async with _mock_text(config, tokenizer, meter, text, line_ends) as served:
            yield served


@contextlib.asynccontextmanager
async def _replay(
    config: MockConfig, tokenizer: Tokenizer, meter: Meter
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`serve RECORDING --as`: each request answered by the recorded exchange it matches,
    as recorded (`--as recorded`) or its text in the provider's format."""
    recording = load_recording(config.source)
    count = len(recording.exchanges)
    exchanges = f"{count} recorded exchange{'' if count == 1 else 's'} of {config.source}"
    if config.provider != AS_RECORDED:
        answers = Cassette.of_answers(recording)
        async with _mock_text(config, tokenizer, meter, answers, False) as (mock, app, notes):
            yield mock, app, [*notes, f"answering with the text of {exchanges}"]
        return
    pacer = partial(Pacer, rate=config.rate, delay=config.delay, realtime=config.realtime)
    player = Player(
        Cassette(recording.exchanges),
        meter,
        tokenizer=tokenizer,
        pacer=pacer if pacer().active else None,
        heartbeat=config.heartbeat_s,
        once=config.once,
        access=config.access,
    )
    yield player, create_player_app(player), [f"replaying {exchanges} at {{url}}/"]


@contextlib.asynccontextmanager
async def _mock_text(
    config: MockConfig,
    tokenizer: Tokenizer,
    meter: Meter,
    text: SharedText | FileText | Cassette,
    line_ends: bool,
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """The mock over `text` (or a cassette's recorded answers); with `line_ends`, each chunk
    is a line given back its `\\n`."""
    pacer = partial(Pacer, rate=config.rate, delay=config.delay, realtime=config.realtime)
    mock = Mock(
        config.provider,
        text,
        meter,
        tokenizer=tokenizer,
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
    try:
        if config.record is not None:
            recorder = Recorder(config.record, redactor=redactor, mode=config.record_mode)
            held = f", after the {recorder.held} it holds" if recorder.held else ""
            notes.append(f"recording every exchange to {config.record}{held}")
        proxy = Proxy(
            upstream,
            meter,
            tokenizer=tokenizer,
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
            warnings += [f"not recorded: {why}" for why in recorder.unrecorded]
