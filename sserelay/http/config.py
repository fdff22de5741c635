"""What a run is asked to do: one frozen, self-validating config per command.

`ServeConfig` (`sserelay serve`), `MockConfig` (`sserelay serve --as`) and `ProxyConfig`
(`sserelay proxy`) hold every setting of their command, checked when they are made: a bad
value raises ConfigError naming its `field` (the CLI turns that into a usage error on the
option that set it). Settings that need a file or the source to check (a price list, a
recording's timing) are checked by `run()` before it listens.

    config = sserelay.ServeConfig(source="answer.txt", port=0, keep=True)
    result = asyncio.run(sserelay.run(config))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sserelay.cluster.keys import check_topic
from sserelay.errors import ConfigError
from sserelay.http.access import Access
from sserelay.http.limits import RequestLimits
from sserelay.metering.tokens import tokenizer_names
from sserelay.providers.answers import PROVIDERS
from sserelay.providers.payloads import PAYLOAD_KINDS
from sserelay.record.format import AS_RECORDED
from sserelay.record.recorder import RECORD_MODES
from sserelay.streaming.hub import DEFAULT_LINGER, DEFAULT_MAX_LAG
from sserelay.streaming.log import DEFAULT_HISTORY
from sserelay.wire.chunking import CHUNK_MODES

#: What a `--redis` URL may start with (redis-py's schemes).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _finite(name: str, value: float | None, *, low: float = 0.0, open_low: bool = False) -> None:
    """`value` must be a finite number at least `low` (over it, with `open_low`), or None."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{value!r} is not a finite number", name)
    if value < low or (open_low and value == low):
        relation = "over" if open_low else "at least"
        raise ConfigError(f"{value:g} is not {relation} {low:g}", name)


def _choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", name)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every command shares: where to listen, how to count and price tokens,
    heartbeats, ids, and who may connect."""

    host: str = "127.0.0.1"
    #: 0 picks a free port
    port: int = 8000
    tokenizer: str = "whitespace"
    #: currency per 1M tokens
    price: float | None = None
    #: seconds between `: ping` comments on an idle stream; None or 0: no pings
    heartbeat: float | None = 15.0
    ids: bool = True
    access: Access = field(default_factory=Access)
    #: where usage rows are kept (a path: SQLite; `*.jsonl`; a `postgresql://` URL); None:
    #: nowhere but the bill. The command line defaults it for `proxy` and `serve --as`.
    ledger: str | None = None
    #: seconds between checkpoints of the open rows (and heartbeats) in the ledger
    checkpoint: float = 1.0
    #: a TOML keys file: who may connect, with budgets and rate limits (see metering/keys.py)
    keys: str | None = None
    #: serve `/metrics`, `/usage` and the dashboard's figures (off: a proxy forwards those
    #: paths upstream like any other)
    metrics: bool = True
    #: what a request must present to read them; None: loopback clients only
    admin_token: str | None = None
    #: a Redis URL (`redis://`, `rediss://`, `unix://`): keys' budgets and rate limits are
    #: shared with every instance on it, and `serve` may publish or follow a topic there
    redis: str | None = None
    #: bounds on each request's head, the time it takes to arrive, and its body
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"{self.port!r} is not a port (0 to 65535)", "port")
        if not self.host:
            raise ConfigError("the address is empty", "host")
        _choice("tokenizer", self.tokenizer, tokenizer_names())
        _finite("price", self.price)
        # A price this large overflows to infinity in a cost: refuse it here.
        if self.price is not None and self.price * 1e12 == math.inf:
            raise ConfigError(f"{self.price:g} is too large a price", "price")
        _finite("heartbeat", self.heartbeat)
        _finite("checkpoint", self.checkpoint, open_low=True)
        if self.ledger is not None and not self.ledger.strip():
            raise ConfigError("the ledger target is empty", "ledger")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ConfigError("the admin token is empty", "admin_token")
        if self.redis is not None and not self.redis.startswith(REDIS_SCHEMES):
            raise ConfigError("a Redis URL starts with redis://, rediss:// or unix://", "redis")
        access = self.access
        if access.token is not None and not access.token.strip():
            raise ConfigError("the token is empty", "auth_token")
        if access.max_clients is not None and access.max_clients < 1:
            raise ConfigError(f"{access.max_clients} is not at least 1", "max_clients")

    @property
    def heartbeat_s(self) -> float | None:
        """The heartbeat interval, None when off."""
        return self.heartbeat or None


@dataclass(frozen=True, kw_only=True)
class _Paced(RunConfig):
    """A run that reads a source and may pace it."""

    #: a path, or "-" for stdin
    source: str = "-"
    #: a program and its arguments, run under a pty: its output is the source instead
    command: tuple[str, ...] = ()
    chunk: str = "line"
    #: tokens per second
    rate: float | None = None
    #: seconds between events
    delay: float = 0.0
    #: replay a recording with its recorded timing
    realtime: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("chunk", self.chunk, CHUNK_MODES)
        if self.command:
            object.__setattr__(self, "command", tuple(self.command))  # a list given is kept
            if not self.command[0]:
                raise ConfigError("the command is empty", "command")
            if self.source != "-":
                raise ConfigError("give SOURCE or a command to run, not both", "command")
        _finite("rate", self.rate, open_low=True)
        _finite("delay", self.delay)
        if self.realtime and (self.rate is not None or self.delay):
            raise ConfigError(
                "--realtime replays the recorded timing: drop --rate and --delay", "realtime"
            )


@dataclass(frozen=True, kw_only=True)
class ServeConfig(_Paced):
    """`sserelay serve SOURCE`: the source as a live SSE stream, to every client."""

    #: serve until interrupted; later clients get the history
    keep: bool = False
    #: events kept for late clients and resumes
    history: int = DEFAULT_HISTORY
    #: cut a client this many events behind (None: the larger of the default and history)
    max_lag: int | None = None
    #: seconds a stream waits for a resume after its last client left before the end
    linger: float = DEFAULT_LINGER
    #: publish the source to this topic on `redis` (and serve it from there)
    topic: str | None = None
    #: serve this topic on `redis`, published by another instance: no source
    follow: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite("linger", self.linger)
        self._check_topic()
        if not isinstance(self.history, int) or self.history < 0:
            raise ConfigError(f"{self.history!r} is not a number of events", "history")
        if self.max_lag is not None:
            if self.max_lag < 1:
                raise ConfigError(f"{self.max_lag} is not at least 1", "max_lag")
            if self.max_lag < self.history:
                raise ConfigError(
                    f"{self.max_lag} is less than --history {self.history}: a client replaying "
                    "the history starts that far behind",
                    "max_lag",
                )

    def _check_topic(self) -> None:
        for name in ("topic", "follow"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                check_topic(value)
            except ValueError as exc:
                raise ConfigError(str(exc), name) from None
            if self.redis is None:
                raise ConfigError("a topic lives on Redis: give --redis URL", name)
            if not self.ids:
                raise ConfigError("a topic's events carry their stream ids: drop --no-ids", name)
        if self.follow is None:
            return
        if self.topic is not None:
            raise ConfigError("--topic publishes a source, --follow serves one: not both", "follow")
        if self.command or self.source != "-":
            raise ConfigError("--follow serves a topic: it takes no SOURCE nor command", "follow")
        if self.rate is not None or self.delay or self.realtime:
            raise ConfigError("--follow serves the topic as published: no pacing", "follow")

    @property
    def lag_limit(self) -> int:
        """The max lag in force."""
        return self.max_lag if self.max_lag is not None else max(DEFAULT_MAX_LAG, self.history)


@dataclass(frozen=True, kw_only=True)
class MockConfig(_Paced):
    """`sserelay serve SOURCE --as PROVIDER`: a mock of the provider's API answering with
    the source's text, each request anew (with a recording's, the text of the exchange
    each request matches). `--as recorded` replays a recording's exchanges as recorded."""

    #: one of PROVIDERS, or "recorded"
    provider: str = "openai"
    #: end with the first completion request (the first request, as recorded)
    once: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("provider", self.provider, (*PROVIDERS, AS_RECORDED))


@dataclass(frozen=True, kw_only=True)
class ProxyConfig(RunConfig):
    """`sserelay proxy --upstream URL`: a metering gateway in front of an LLM API."""

    upstream: str
    #: ('Name', 'value') pairs added to every upstream request (never printed)
    upstream_headers: tuple[tuple[str, str], ...] = ()
    payload: str = "auto"
    keep_comments: bool = False
    include_usage: bool = False
    #: a TOML price list, per model
    prices: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    once: bool = False
    #: record every exchange to this file (a cassette)
    record: str | None = None
    #: what to do if `record` exists: refuse it ("new"), "overwrite" it, or "append" to it
    record_mode: str = "new"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("payload", self.payload, PAYLOAD_KINDS)
        _choice("record_mode", self.record_mode, RECORD_MODES)
        if self.record is None and self.record_mode != "new":
            raise ConfigError("--force and --append go with --record", "record")
        _finite("connect_timeout", self.connect_timeout, open_low=True)
        _finite("read_timeout", self.read_timeout, open_low=True)
        if not self.upstream:
            raise ConfigError("the upstream URL is empty", "upstream")


Config = ServeConfig | MockConfig | ProxyConfig
