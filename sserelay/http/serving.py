"""What serves each command: the endpoint for a config, its ASGI app and what it holds.

`serve` gets a hub over its source (or a topic), `serve --as` a mock over a text or a
recording, `proxy` the upstream; `run()` listens with what `serving()` yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from sserelay.errors import ConfigError
from sserelay.http.cluster import (
    Cluster,
    follow_topic,
    publish_topic,
    topic_session,
)
from sserelay.http.config import Config, MockConfig, ProxyConfig, ServeConfig
from sserelay.http.endpoint import Endpoint
from sserelay.http.mock_app import COMPLETION_PATHS, Mock, create_mock_app
from sserelay.http.proxy_app import Proxy, create_proxy_app
from sserelay.http.replay_app import Player, create_player_app
from sserelay.http.stream_app import StreamSession, create_app, ui_page
from sserelay.metering.meter import Meter
from sserelay.metering.tokens import TokenCounter, Tokenizer
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
from sserelay.sources.command import CommandSource
from sserelay.sources.pacing import Pacer
from sserelay.sources.shared import FileText, SharedText
from sserelay.sources.text import TextSource
from sserelay.sources.upstream import Timeouts, Upstream
from sserelay.streaming.hub import Hub


@contextlib.asynccontextmanager
async def serving(
    config: Config,
    tokenizer: Tokenizer,
    meter: Meter,
    warnings: list[str],
    cluster: Cluster | None = None,
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """The endpoint for `config`, billing on `meter`, its ASGI app, and the lines said under
    `serving on URL`; what it holds is released on the way out, after the server stops,
    with anything that went wrong on the side added to `warnings`."""
    if isinstance(config, ServeConfig):
        serving = _serve(config, tokenizer, meter, cluster)
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
    config: ServeConfig, tokenizer: Tokenizer, meter: Meter, cluster: Cluster | None = None
) -> AsyncIterator[tuple[Endpoint, Any, list[str]]]:
    """`serve`: one hub over the source, broadcast to every client, and /ui (with a topic,
    the source published to Redis, or no source: the topic followed)."""
    if config.follow is not None:
        assert cluster is not None  # the config requires --redis
        async with follow_topic(config, meter, cluster) as hub:
            session = topic_session(config, hub, meter, None)
            page = ui_page(tokenizer=tokenizer.name, chunk=config.chunk, payloads="", mode="serve")
            note = f"following topic {config.follow} on redis {cluster.connection.display}"
            yield session, create_app(session, ui=page), [note]
        return
    source: TextSource | RecordingSource | CommandSource
    if config.command:
        source = CommandSource(config.command, config.chunk)
    elif looks_like_recording(config.source):
        source = RecordingSource(config.source)
    else:
        source = TextSource(config.source, config.chunk)
    _check_realtime(config.realtime, source.name, source.timed)
    async with source:
        async with _serve_source(config, tokenizer, meter, source, cluster) as served:
            yield served


@contextlib.asynccontextmanager
async def _serve_source(
    config: ServeConfig,
    tokenizer: Tokenizer,
    meter: Meter,
    source: TextSource | RecordingSource | CommandSource,
    cluster: Cluster | None = None,
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
    page = ui_page(tokenizer=tokenizer.name, chunk=config.chunk, payloads=payloads, mode="serve")
    if config.topic is not None:
        assert cluster is not None  # the config requires --redis
        published = publish_topic(
            config, cluster, source, count=count, count_end=count_end, pending=pending
        )
        async with published as (hub, publishing):
            session = topic_session(config, hub, meter, publishing)
            note = f"publishing to topic {config.topic} on redis {cluster.connection.display}"
            yield session, create_app(session, ui=page), [note]
        return
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
        hub,
        meter,
        heartbeat=config.heartbeat_s,
        keep=config.keep,
        access=config.access,
        linger=config.linger,
    )
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
    """`serve --as`: a recording answers each request with the exchange it matches; a file
    is read anew for each request; stdin, a pipe, a FIFO or a command once and kept; each
    request is paced on its own, by a new Pacer."""
    if not config.command and looks_like_recording(config.source):
        async with _replay(config, tokenizer, meter) as served:
            yield served
        return
    if config.provider == AS_RECORDED:
        name = "stdin" if config.source in ("", "-") else config.source
        raise ConfigError(f"--as recorded replays a recording; {name} is not one", "provider")

    def open_source() -> TextSource | CommandSource:
        if config.command:
            return CommandSource(config.command, config.chunk)
        return TextSource(config.source, config.chunk)

    _check_realtime(config.realtime, " ".join(config.command) or config.source, False)
    async with contextlib.AsyncExitStack() as held:
        first = open_source()
        await held.enter_async_context(first)  # a missing file fails now, before listening
        text: SharedText | FileText
        if first.rereadable:
            await held.aclose()  # it opens; each request opens its own
            text = FileText(open_source)
        else:  # stdin, a pipe, a FIFO, a command: read once and kept, closed at the end
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
    secrets = [
        *upstream.secrets,
        *(token for token in (config.access.token, config.admin_token) if token),
    ]
    redactor = Redactor(secrets)
    recorder = None
    notes = [f"proxying to {upstream.display}"]
    if (variable := upstream.ignored_proxy) is not None:
        notes.append(f"{variable} is set but not used: the upstream is reached directly")
    try:
        if config.record is not None:
            recorder = Recorder(config.record, redactor=redactor, mode=config.record_mode)
            held = f", after the {recorder.held} it holds" if recorder.held else ""
            notes.append(f"recording every exchange to {config.record}{held}")
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
            warnings += [f"not recorded: {why}" for why in recorder.unrecorded]
