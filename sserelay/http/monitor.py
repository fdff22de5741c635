"""The run's own pages: `/metrics`, `/usage`, the `/ui` dashboard and its feed, `/ui/events`.

`Monitor.wrap(app)` answers those four paths itself, before the endpoint's app sees a request,
for every command alike: a proxy never forwards them upstream. Everything they show comes from
one `Tally` subscribed to the meter's observer hook; nothing here is on the per-event path.

Who may read them (the dashboard's page itself holds no figures and is always served):

- With an admin token (`--admin-token`), only a request that presents it, the way a client
  presents its own secret (`Authorization: Bearer`, `x-api-key`, `x-goog-api-key`, `?token=`
  or `?key=`), compared in constant time: 401 otherwise.
- Without one, only clients on the loopback interface (127.0.0.0/8, ::1): 403 for others.
  The figures name keys, models and costs, which a relay listening on a public address must
  not hand to anyone who reaches the port; a local `curl`, browser or Prometheus needs no
  setup, and a remote scraper needs a secret. (Behind a reverse proxy on the same host every
  peer is loopback: set an admin token there.)

The feed is an SSE stream served by the relay's own `relay_frames()` (dogfood): `hello` with
the history of samples, a `tick` every `interval` seconds with the live figures, and `done`
with the run's reason when the run ends, after which the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sserelay import __version__
from sserelay.errors import ClientDisconnected
from sserelay.http.access import AmbiguousCredentials, Refusal, presented_secret
from sserelay.http.asgi import ASGISink, header, peer, send_json, send_response
from sserelay.http.endpoint import Endpoint, answer_error
from sserelay.http.metrics import BudgetStatus, RunCollector, exposition, new_registry
from sserelay.http.stream_app import UI_HEADERS
from sserelay.ledger.errors import LedgerError
from sserelay.metering.budget import period_start
from sserelay.metering.figures import View
from sserelay.metering.keys import Period
from sserelay.metering.meter import ClientMeter, Meter
from sserelay.metering.tally import Tally
from sserelay.streaming.stream import SSE_HEADERS, relay_frames
from sserelay.wire.frames import Frames
from sserelay.wire.sse import Event, encode_event

#: The paths a Monitor answers itself.
PATHS = ("/metrics", "/usage", "/ui", "/ui/events")
#: Samples of the live figures kept for a dashboard that opens late (at 1 s: 10 minutes).
HISTORY = 600
#: Requests in flight listed in a tick.
IN_FLIGHT = 20
#: How long a ledger's spend figures are reused: a dashboard polling /usage must not
#: query the ledger for every key on every poll.
SPEND_TTL = 1.0

#: The dashboard's headers: the same policy as the stream's page (it loads nothing from
#: anywhere and may connect only to this server).
_UI_HEADERS = [(name.lower().encode(), value.encode()) for name, value in UI_HEADERS.items()]
_NO_STORE = [(b"cache-control", b"no-store")]

#: What a ledger answers `spent(key, since)` with: (tokens, cost).
Spent = Callable[[str | None, datetime], Awaitable[tuple[int, float]]]


def is_loopback(scope: Scope) -> bool:
    """Whether the request comes from this host's loopback interface."""
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def admin_refusal(scope: Scope, token: str | None) -> Refusal | None:
    """None if the request may read the run's figures, else why not (see the module)."""
    if token is None:
        if is_loopback(scope):
            return None
        return Refusal(
            403,
            None,
            "forbidden: the figures are served to loopback clients only; "
            "start sserelay with --admin-token to read them from elsewhere",
        )
    try:
        given = presented_secret(scope)
    except AmbiguousCredentials as exc:
        return Refusal(400, None, f"bad request: {exc}")
    if given is not None and hmac.compare_digest(given.encode(), token.encode()):
        return None
    return Refusal(
        401,
        None,
        "unauthorized: send the admin token (Authorization: Bearer TOKEN, or ?token=TOKEN)",
        ((b"www-authenticate", b'Bearer realm="sserelay admin"'),),
    )


def _iso(wall: float) -> str:
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Monitor:
    """The figures of one run, and the ASGI routes that serve them (see the module).

    `mode` is `serve`, `mock` or `proxy`; `page` the dashboard's HTML (None: the app serves
    `/ui` itself, as `serve`'s does); `spent` the ledger's
    `spent()` (None: no ledger); `budgets` what issue 14's budgets say about each key."""

    def __init__(
        self,
        meter: Meter,
        endpoint: Endpoint,
        *,
        mode: str,
        tokenizer: str,
        page: str | None,
        admin_token: str | None = None,
        spent: Spent | None = None,
        ledger: str | None = None,
        budgets: BudgetStatus | None = None,
        interval: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.meter = meter
        self.endpoint = endpoint
        self.mode = mode
        self.tokenizer = tokenizer
        self.page = None if page is None else page.encode()
        self.admin_token = admin_token
        self.interval = interval
        self.tally = Tally(meter)
        meter.subscribe(self.tally)
        self.collector = RunCollector(self.tally, mode=mode, tokenizer=tokenizer, budgets=budgets)
        self.registry = new_registry(self.collector)
        self._spent = spent
        self._ledger = ledger
        self._wall_clock = wall_clock
        self.started_wall = wall_clock()
        self._samples: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._tick: bytes = b""
        self._ticked = asyncio.Event()
        self._done: bytes | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._spend_cache: tuple[float, dict[str, Any]] | None = None
        self._recent_served = -1
        #: feeds open now; while there are none, the ticker only samples the totals
        self._feeds = 0
        self._stale = True

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Begin sampling the figures (for the dashboard's charts and its feed)."""
        self._samples.append(self._make_tick())
        self._ticker = asyncio.create_task(self._run_ticker())

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        self._finish()

    async def _run_ticker(self) -> None:
        finished = asyncio.ensure_future(self.endpoint.finished.wait())
        try:
            while not finished.done():
                await asyncio.wait({finished}, timeout=self.interval)
                self._sample()
        finally:
            finished.cancel()
            self._finish()

    def _finish(self) -> None:
        if self._done is None:
            reason = str(self.endpoint.reason or "interrupted")
            self._done = _event("done", {"reason": reason})
            self._wake()

    def _wake(self) -> None:
        ticked, self._ticked = self._ticked, asyncio.Event()
        ticked.set()

    # ------------------------------------------------------------------ figures

    def _sample(self) -> None:
        """Take the figures now: a sample for the charts, and a tick for the feeds. With no
        feed open, only the sample (the totals, not every open client's labels): a dashboard
        opened later still gets the history."""
        if not self._feeds:
            totals = self.meter.totals()
            self._samples.append(
                {
                    "t": round(totals.elapsed_s, 3),
                    "tokens": totals.tokens,
                    "requests": self.tally.served,
                    "clients": totals.active_clients,
                    "by_reason": self.tally.by_reason(),
                }
            )
            self._stale = True
            return
        self._samples.append(self._make_tick())

    def _make_tick(self) -> dict[str, Any]:
        """A tick for every feed, from a view of every figure; returns its sample."""
        view = self.tally.view()
        sample = {
            "t": round(view.totals.elapsed_s, 3),
            "tokens": view.totals.tokens,
            "requests": view.served,
            "clients": view.clients,
            "by_reason": view.by_reason(),
        }
        tick: dict[str, Any] = {
            "sample": sample,
            "usage": self.usage(view),
            "active": self._in_flight(),
        }
        if view.served != self._recent_served or self._stale:
            self._recent_served = view.served
            tick["recent"] = [row.to_dict() for row in view.recent]
        self._stale = False
        self._tick = _event("tick", tick)
        self._wake()
        return sample

    def _in_flight(self) -> list[dict[str, Any]]:
        now = self.meter.now()
        rows = []
        for client in self.meter.clients[:IN_FLIGHT]:
            elapsed = max(0.0, now - client.opened_at)
            rows.append(
                {
                    "id": client.request_id,
                    "key": client.key,
                    "model": _shown_model(client),
                    "tokens": client.tokens,
                    "elapsed_s": round(elapsed, 3),
                    "first_event_s": None
                    if client.first_event_at is None
                    else round(client.first_event_at - client.opened_at, 6),
                }
            )
        return rows

    def usage(self, view: View | None = None) -> dict[str, Any]:
        """The live part of `/usage`: totals since the start, per key and per model."""
        view = view or self.tally.view()
        totals = view.totals
        counted = sum(h.count for h in view.ttft.values())
        first = sum(h.sum for h in view.ttft.values()) / counted if counted else None
        return {
            "sserelay": __version__,
            "mode": self.mode,
            "tokenizer": self.tokenizer,
            "started_at": _iso(self.started_wall),
            "uptime_s": round(totals.elapsed_s, 3),
            "totals": {
                "requests": view.served,
                "active": view.clients,
                "tokens": totals.tokens,
                "events": totals.events,
                "bytes": totals.bytes,
                "cost": totals.cost,
                "tokens_per_s": round(totals.tokens_per_s, 3),
                # the mean over every client that got an event
                "time_to_first_token_s": None if first is None else round(first, 6),
            },
            "by_reason": view.by_reason(),
            "by_key": {name: sums.to_dict() for name, sums in view.by_key().items()},
            "by_model": {name: sums.to_dict() for name, sums in view.by_model().items()},
            **self._budgets(),
        }

    def _budgets(self) -> dict[str, Any]:
        """Each key's budget this period, where keys have budgets."""
        if self.collector.budgets is None:
            return {}
        statuses = self.collector.budgets(self._wall_clock())
        return {
            "budgets": [{**asdict(status), "period": str(status.period)} for status in statuses]
        }

    async def spend(self) -> dict[str, Any] | None:
        """What the ledger holds for each key since the start of the UTC day (None without a
        ledger): rows of other runs and instances included, open rows at their last
        checkpoint. Kept for SPEND_TTL seconds."""
        if self._spent is None:
            return None
        now = self._wall_clock()
        if self._spend_cache is not None and now - self._spend_cache[0] < SPEND_TTL:
            return self._spend_cache[1]
        since = datetime.fromtimestamp(period_start(Period.DAY, now), UTC)
        keys: list[str | None] = [None, *self.tally.keys]
        out: dict[str, Any] = {
            "ledger": self._ledger,
            "period": "day",
            "since": since.isoformat().replace("+00:00", "Z"),
            "keys": [],
            "error": None,
        }
        try:
            for key in keys:
                tokens, cost = await self._spent(key, since)
                if key is None and not tokens and not cost:
                    continue  # no rows without a key: nothing to say
                out["keys"].append({"key": key, "tokens": tokens, "cost": round(cost, 10)})
        except LedgerError as exc:
            out["error"] = str(exc)
        self._spend_cache = (now, out)
        return out

    # ------------------------------------------------------------------ HTTP

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """`app`, with PATHS answered here first."""

        # Not a coroutine: it hands over the app's awaitable, so no frame of its own
        # stays suspended for as long as each stream is open (240 B per client).
        def monitored(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
            path = scope["path"] if scope["type"] == "http" else ""
            if path in PATHS and not (path == "/ui" and self.page is None):
                return self.handle(scope, receive, send)
            return app(scope, receive, send)

        return monitored

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await answer_error(
                send, 405, f"{path} answers GET only", None, headers=((b"allow", b"GET, HEAD"),)
            )
            return
        if path == "/ui" and self.page is not None:
            await send_response(send, 200, self.page, b"text/html; charset=utf-8", _UI_HEADERS)
            return
        refusal = admin_refusal(scope, self.admin_token)
        if refusal is not None:
            await answer_error(send, refusal.status, refusal.message, None, headers=refusal.headers)
            return
        if path == "/metrics":
            body, content_type = exposition(self.registry, header(scope, b"accept"))
            await send_response(send, 200, body, content_type.encode(), _NO_STORE)
        elif path == "/usage":
            document = self.usage()
            document["spend"] = await self.spend()
            await send_json(send, 200, document, _NO_STORE)
        else:
            await self._feed(scope, receive, send)

    async def _feed(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await send_response(send, 200, b"", b"text/event-stream", _NO_STORE)
            return
        sink = ASGISink(receive, send, scope)
        # Its own tally, on no meter: a dashboard watching is not a client of the bill.
        watcher = ClientMeter(0, peer(scope), time.monotonic)
        try:
            await relay_frames(
                sink, self._frames(), client=watcher, headers=[*SSE_HEADERS, *_NO_STORE]
            )
        except ClientDisconnected:
            return
        await sink.end()

    async def _frames(self) -> AsyncIterator[Frames]:
        self._feeds += 1
        try:
            if self._stale and self._done is None:
                self._samples.append(self._make_tick())  # not kept up with no feed open
            hello = {
                "mode": self.mode,
                "tokenizer": self.tokenizer,
                "interval": self.interval,
                "samples": list(self._samples)[:-1],  # the tick after it brings the last
                "recent": [row.to_dict() for row in self.tally.view().recent],
            }
            sent = self._tick
            yield Frames(_event("hello", hello) + sent, 2, 0)
            while True:
                if self._tick is not sent:  # the latest only: a slow page skips, never lags
                    sent = self._tick
                    yield Frames(sent, 1, 0)
                elif self._done is not None:
                    yield Frames(self._done, 1, 0)
                    return
                else:
                    await self._ticked.wait()
        finally:
            self._feeds -= 1


def _event(name: str, data: object) -> bytes:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return encode_event(Event(text, event=name))


def _shown_model(client: ClientMeter) -> str | None:
    model = client.model
    if model is not None and len(model) > 200:
        return model[:199] + "…"
    return model
