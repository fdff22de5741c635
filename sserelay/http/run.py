"""`run(config) -> RunResult`: the one library entry. The CLI is its user.

A run opens what it serves (the source, the upstream, a recording), listens, serves until
its endpoint finishes (the stream ended, the one request of `--once` ended, a signal or
`Running.stop()`), and returns the bill with the run's error and the signal that ended it.
Everything that can fail before the first client (a bad setting, a missing file, a port in
use) raises an SSERelayError before listening. Observers (sserelay.metering.MeterObserver)
hear of every client as it opens, writes and closes: receipts, a ledger, metrics.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sserelay.errors import ConfigError
from sserelay.http.access import Keys
from sserelay.http.cluster import (
    Cluster,
    open_cluster,
    shared_budgets,
    watch_instances,
)
from sserelay.http.config import Config, MockConfig, ProxyConfig, ServeConfig
from sserelay.http.endpoint import Endpoint
from sserelay.http.monitor import Monitor, Spent
from sserelay.http.proxy_app import Proxy
from sserelay.http.server import bound_address, listen, serve_app
from sserelay.http.serving import serving
from sserelay.http.stream_app import StreamSession, ui_page
from sserelay.ledger import QueuedLedger, new_instance_id, open_ledger
from sserelay.ledger.writer import LedgerWriter
from sserelay.metering.bill import Bill, ClientBill, Totals
from sserelay.metering.budget import Budgets, Spend, period_start
from sserelay.metering.keys import KeyRing
from sserelay.metering.meter import MAX_BILL_ROWS, ClientMeter, Meter, MeterObserver
from sserelay.metering.pricing import PriceList, Pricing
from sserelay.metering.reason import Reason
from sserelay.metering.tokens import Tokenizer, tokenizer_for

if TYPE_CHECKING:
    from sserelay.cluster.budget import RedisBudgetStore

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
        monitor: Monitor | None = None,
    ) -> None:
        self.url = url
        self.notes = notes
        #: the ledger that keeps the run's rows (its display: no password), if any
        self.ledger = ledger
        self._meter = meter
        self._endpoint = endpoint
        #: the run's live figures (/metrics, /usage, the dashboard), if they are served
        self.monitor = monitor
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
    if exposed := _exposed_credential(config):
        warnings.append(exposed)
        if on_warning is not None:
            on_warning(exposed)

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    instance = new_instance_id()
    async with (
        open_cluster(config.redis, instance, warn) as cluster,
        _ledger(config, meter, warnings, on_warning, instance) as ledger,
        watch_instances(cluster, None if ledger is None else ledger.ledger, _dead_after(config)),
        shared_budgets(cluster if _has_keys(config) else None) as store,
    ):
        keys = await _keys(config, None if ledger is None else ledger.ledger, store)
        endpoint, signals = await _serve_until_done(
            config,
            tokenizer,
            meter,
            warnings,
            on_ready,
            handle_signals,
            sock,
            ledger,
            keys,
            cluster,
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
    ledger: _LedgerUse | None,
    keys: Keys | None,
    cluster: Cluster | None,
) -> tuple[Endpoint, list[int]]:
    """Serve `config` until its endpoint finishes; the endpoint and the signals seen."""
    async with (
        serving(config, tokenizer, meter, warnings, cluster) as (endpoint, app, notes),
        _monitoring(config, tokenizer, meter, endpoint, ledger, keys) as monitor,
    ):
        endpoint.keys = keys
        endpoint.max_body = config.limits.body_bytes
        if monitor is not None:
            app = monitor.wrap(app)
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
                display = None if ledger is None else ledger.display
                on_ready(Running(url, said, meter, endpoint, display, monitor))

        await serve_app(
            app,
            sock,
            finished=endpoint.finished,
            on_signal=on_signal if handle_signals else None,
            on_ready=ready,
            limits=config.limits,
        )
    return endpoint, signals


def _exposed_credential(config: Config) -> str | None:
    """The warning for a proxy that lends its upstream credential to anyone who reaches it:
    listening beyond this machine with --upstream-header and no --keys nor --auth-token."""
    if not isinstance(config, ProxyConfig) or not config.upstream_headers:
        return None
    if config.keys is not None or config.access.token is not None:
        return None
    try:
        loopback = ipaddress.ip_address(config.host.strip("[]")).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if loopback:
        return None
    return (
        f"listening on {config.host} with --upstream-header and no --keys or --auth-token: "
        "anyone who reaches the port spends that credential"
    )


def _has_keys(config: Config) -> bool:
    return config.keys is not None or config.access.token is not None


async def _keys(
    config: Config, ledger: QueuedLedger | None, store: RedisBudgetStore | None = None
) -> Keys | None:
    """Who may use the relay and how much: the keys file (ConfigError naming its line if it
    is wrong), and `--auth-token` as one anonymous key without limits. Each key's spend
    this period is read from the ledger, so a restart does not reset anyone's budget; with
    a shared `store` (Redis), what the instances spent together is kept there."""
    token = config.access.token
    if not _has_keys(config):
        return None
    ring = KeyRing(())
    if config.keys is not None:
        try:
            with open(config.keys, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot read {config.keys}: {detail}", "keys") from None
        ring = KeyRing.from_toml(text, config.keys)
    if token is not None:
        try:
            ring = KeyRing((*ring.keys, *KeyRing.anonymous(token).keys))
        except ValueError as exc:  # the token is also a key's secret
            raise ConfigError(str(exc), "auth_token") from None
    now = time.time()
    spent = {}
    if ledger is not None:
        for key in ring:
            if key.limited:
                since = datetime.fromtimestamp(period_start(key.period, now), UTC)
                tokens, cost = await ledger.spent(key.name, since)
                spent[key.name] = Spend.of(tokens, cost)
    budgets = Budgets(ring, spent=spent, now=now, store=store)
    if store is not None:
        await store.start(budgets, now)
    return Keys(ring, budgets, record_refusals=config.keys is not None)


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
    """The run's ledger, as run() reports it (and /usage reads it)."""

    def __init__(self, ledger: QueuedLedger) -> None:
        self.ledger = ledger
        self.display = ledger.display
        self.spent: Spent = ledger.spent
        self.unwritten = 0


@contextlib.asynccontextmanager
async def _monitoring(
    config: Config,
    tokenizer: Tokenizer,
    meter: Meter,
    endpoint: Endpoint,
    ledger: _LedgerUse | None,
    keys: Keys | None,
) -> AsyncIterator[Monitor | None]:
    """The run's /metrics, /usage and dashboard (None with `metrics` off), sampling from
    before the server listens until it has stopped."""
    if not config.metrics:
        yield None
        return
    if isinstance(config, ServeConfig):
        mode, page = "serve", None  # the stream app serves /ui, with the source's settings
    else:
        mode = "mock" if isinstance(config, MockConfig) else "proxy"
        page = ui_page(tokenizer=tokenizer.name, chunk="line", payloads="", mode=mode)
    monitor = Monitor(
        meter,
        endpoint,
        mode=mode,
        tokenizer=tokenizer.name,
        page=page,
        admin_token=config.admin_token,
        spent=None if ledger is None else ledger.spent,
        ledger=None if ledger is None else ledger.display,
        # sserelay_budget_remaining and /usage's budgets, once keys have budgets
        budgets=None if keys is None else keys.budgets.status,
    )
    if isinstance(endpoint, Proxy):
        endpoint.on_upstream_closed = monitor.tally.upstream_closed
    monitor.start()
    try:
        yield monitor
    finally:
        await monitor.aclose()


@contextlib.asynccontextmanager
async def _ledger(
    config: Config,
    meter: Meter,
    warnings: list[str],
    on_warning: Callable[[str], None] | None,
    instance: str,
) -> AsyncIterator[_LedgerUse | None]:
    """The config's ledger, opened before anything listens (LedgerError if it cannot be),
    with the rows of dead instances closed as `crashed`, written to from the meter's hook
    and closed after the bill: what it could not store is said in `warnings`."""
    if config.ledger is None:
        yield None
        return

    def warn(message: str) -> None:
        # Said now (a lost database must not wait for the exit) and kept for the result.
        warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    ledger = open_ledger(config.ledger, instance=instance, on_warning=warn)
    await ledger.open()
    use = _LedgerUse(ledger)
    dead_after = _dead_after(config)
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


def _dead_after(config: Config) -> float:
    return max(DEAD_AFTER, 5 * config.checkpoint)


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
