"""Several instances on one Redis (`--redis URL`): what `run()` builds with it.

- `open_cluster`: the run's Redis, checked before anything listens (one line and exit 1
  when it cannot be reached).
- `publish_topic` (`serve SOURCE --topic NAME`) and `follow_topic` (`serve --follow NAME`):
  a hub over the topic's stream (sserelay.cluster.topic), and the session serving it.
- `shared_budgets`: keys' budgets and rate windows in Redis (sserelay.cluster.budget), so
  that N instances together never let a key pass its budget.
- `watch_instances`: heartbeats in Redis, so a survivor closes a dead instance's open
  ledger rows as `crashed` within seconds.

The redis package is optional (`sserelay[redis]`): it is imported only when `--redis` is
given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sserelay.cluster.errors import RedisUnavailable
from sserelay.http.config import ServeConfig
from sserelay.http.endpoint import Endpoint
from sserelay.http.stream_app import Role, StreamSession
from sserelay.ledger import LedgerError, QueuedLedger
from sserelay.metering.meter import Meter
from sserelay.sources.pacing import Pacer
from sserelay.sources.text import Source
from sserelay.streaming.hub import Hub
from sserelay.streaming.log import StreamLog

if TYPE_CHECKING:
    from sserelay.cluster.budget import RedisBudgetStore
    from sserelay.cluster.connection import Connection

Served = tuple[Endpoint, Any, list[str]]


@dataclass(frozen=True, slots=True)
class Cluster:
    """The run's Redis, the run's instance id (also its ledger's), and where its warnings go."""

    connection: Connection
    instance: str
    warn: Callable[[str], None]


@contextlib.asynccontextmanager
async def open_cluster(
    url: str | None, instance: str, warn: Callable[[str], None]
) -> AsyncIterator[Cluster | None]:
    """The run's Redis (None without `--redis`): RedisUnavailable if it does not answer."""
    if url is None:
        yield None
        return
    try:
        from sserelay.cluster.connection import Connection
    except ImportError:
        raise RedisUnavailable(
            "--redis needs the redis package: pip install 'sserelay[redis]'"
        ) from None
    connection = await Connection.open(url, warn)
    try:
        yield Cluster(connection, instance, warn)
    finally:
        await connection.aclose()


@contextlib.asynccontextmanager
async def follow_topic(config: ServeConfig, meter: Meter, cluster: Cluster) -> AsyncIterator[Hub]:
    """`serve --follow NAME`: the topic read into a hub (all it keeps first, before the run
    listens), closed on the way out."""
    from sserelay.cluster.topic import TopicFeed

    assert config.follow is not None
    feed = TopicFeed(cluster.connection, config.follow, warn=cluster.warn)
    hub = Hub.over(feed, StreamLog(config.history), max_lag=config.lag_limit)
    await feed.load(hub)
    hub.start()
    try:
        yield hub
    finally:
        await hub.aclose()


@contextlib.asynccontextmanager
async def publish_topic(
    config: ServeConfig,
    cluster: Cluster,
    source: Source,
    *,
    count: Callable[[str], int],
    count_end: Callable[[], int] | None,
    pending: Callable[[], int] | None,
) -> AsyncIterator[tuple[Hub, asyncio.Task[None]]]:
    """`serve SOURCE --topic NAME`: the source published to the topic by a task, and this
    instance's hub: what the topic keeps, then each batch once Redis has stored it, with
    the ids Redis gave it (as every follower reads them). What the source gave and Redis
    never got is said in one warning on the way out."""
    from sserelay.cluster.publisher import Publisher
    from sserelay.cluster.topic import TopicFeed

    topic = config.topic
    assert topic is not None
    feed = TopicFeed(
        cluster.connection,
        topic,
        warn=cluster.warn,
        invalid_utf8=lambda: source.invalid_utf8_bytes,
        follow=False,
    )
    hub = Hub.over(feed, StreamLog(config.history), max_lag=config.lag_limit)
    publisher = Publisher(
        cluster.connection,
        topic,
        source,
        instance=cluster.instance,
        count=count,
        count_end=count_end,
        pending=pending,
        pacer=Pacer(rate=config.rate, delay=config.delay, realtime=config.realtime),
        history=config.history,
        mirror=(feed, hub),
    )
    await publisher.open()
    await feed.load(hub)
    hub.reopen()  # what is published from now on is this run's stream, whatever came before
    publishing = asyncio.create_task(publisher.run())
    try:
        yield hub, publishing
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        await hub.aclose()
        if publisher.held:
            cluster.warn(
                f"topic {topic!r}: {publisher.held} events of the source were never stored "
                f"in redis {cluster.connection.display}"
            )


def topic_session(
    config: ServeConfig, hub: Hub, meter: Meter, publishing: asyncio.Task[None] | None
) -> StreamSession:
    """The session serving a topic's hub: as its publisher, or as a follower. A publisher
    that fails (not Redis: a bug) ends the run with its error rather than leaving it
    waiting for an end that will not come."""
    role: Role = "follower" if publishing is None else "publisher"
    session = StreamSession(
        hub, meter, heartbeat=config.heartbeat_s, keep=config.keep, access=config.access, role=role
    )
    if publishing is not None:

        def failed(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and (error := task.exception()) is not None:
                hub.end(f"publishing to topic {config.topic!r} failed: {error}")

        publishing.add_done_callback(failed)
    return session


@contextlib.asynccontextmanager
async def watch_instances(
    cluster: Cluster | None, ledger: QueuedLedger | None, dead_after: float
) -> AsyncIterator[None]:
    """With Redis and a ledger: this instance's heartbeat, and the open rows of instances
    found dead closed as `crashed`."""
    if cluster is None or ledger is None:
        yield
        return
    from sserelay.cluster.presence import Presence

    async def recover(dead: Sequence[str]) -> None:
        # A ledger lost meanwhile: its own periodic recovery closes them later.
        with contextlib.suppress(LedgerError):
            await ledger.recover(dead_after, dead=dead)

    presence = Presence(cluster.connection, ledger.display, cluster.instance, recover)
    presence.start()
    try:
        yield
    finally:
        await presence.aclose()


@contextlib.asynccontextmanager
async def shared_budgets(cluster: Cluster | None) -> AsyncIterator[RedisBudgetStore | None]:
    """The budget store every instance on the run's Redis shares (None without Redis);
    `start()` it with the run's Budgets. On the way out, what waits to be settled is sent."""
    if cluster is None:
        yield None
        return
    from sserelay.cluster.budget import RedisBudgetStore

    store = RedisBudgetStore(cluster.connection, cluster.instance, cluster.warn)
    try:
        yield store
    finally:
        await store.aclose()
