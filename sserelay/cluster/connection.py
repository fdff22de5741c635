"""One run's Redis: the client, what to call it in a message, and its health.

Every part of a run that uses Redis (a topic's reader, a publisher, the shared budgets, the
instances' heartbeats) shares one `Connection`. Redis failing mid-run is not an error that
ends the run: each part keeps what it must (a publisher its backlog, a follower its
clients) and retries. What the user hears is one warning line when Redis is lost and one
when it is back (`Health`), whichever part noticed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis import exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import RedisUnavailable

#: Seconds before a command (or a connection) that gets no answer counts as a failure; a
#: blocking read waits `BLOCK_MS` less than this.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
#: Retry delays after a failure: doubling from the first to the last.
RETRY_FIRST = 0.05
RETRY_LAST = 1.0

Warn = Callable[[str], None]

#: What counts as "Redis is unavailable now" mid-run: worth a retry, never a crash. A
#: server that answers with an error (a wrong type, a failing script) is not unavailable.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    exceptions.ConnectionError,  # refused, reset, closed, still loading, auth lost
    exceptions.TimeoutError,
    exceptions.ReadOnlyError,  # a replica that was the primary: a failover is under way
    OSError,
)
#: Anything Redis can do wrong: what stops a run at its start, and what a loop that must
#: go on (a reader, a publisher) waits out as if Redis were away.
FAILED: tuple[type[BaseException], ...] = (exceptions.RedisError, OSError)


def check_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and the cancel got lost.

    redis-py can swallow a cancel that lands inside one of its calls (redis-py #2028, #2665:
    the call then returns, or fails, as if nothing had happened), and a loop that goes on
    to wait for something else would never end. The task still counts the request
    (`Task.cancelling()`): every loop here checks it after each call to Redis."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def display_url(url: str) -> str:
    """`url` fit to print: its password (if any) masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(exc: BaseException) -> str:
    """A Redis failure in one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Health:
    """Whether Redis answers, as the parts of a run last found it. `lost(exc)` and `ok()`
    are cheap to call on every attempt: the warning is said once per change of state, with
    what each part does meanwhile (`consequences`)."""

    def __init__(self, display: str, warn: Warn) -> None:
        self.display = display
        self.available = True
        self._warn = warn
        #: one clause per part of the run: what it does while Redis is lost
        self.consequences: list[str] = []
        self.lost_at: float | None = None

    def lost(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self.lost_at = time.monotonic()
        meanwhile = "; ".join(self.consequences)
        self._warn(
            f"redis {self.display} is unavailable ({describe(exc)})"
            + (f": {meanwhile}" if meanwhile else "")
        )

    def ok(self) -> None:
        if self.available:
            return
        self.available = True
        gone = "" if self.lost_at is None else f" after {time.monotonic() - self.lost_at:.1f} s"
        self._warn(f"redis {self.display} is back{gone}")


class Backoff:
    """Delays between retries: RETRY_FIRST doubling up to RETRY_LAST; `reset()` on success."""

    def __init__(self) -> None:
        self._next = RETRY_FIRST

    def reset(self) -> None:
        self._next = RETRY_FIRST

    async def wait(self) -> None:
        delay = self._next
        self._next = min(self._next * 2, RETRY_LAST)
        await asyncio.sleep(delay)


class Connection:
    """The run's Redis client (bytes in, bytes out; no retries of its own: the parts retry,
    knowing what is safe to send again) and its `health`."""

    def __init__(self, url: str, warn: Warn) -> None:
        self.url = url
        self.display = display_url(url)
        self.health = Health(self.display, warn)
        try:
            self.client: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=False,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
        except ValueError as exc:  # a URL redis-py cannot read
            raise RedisUnavailable(f"--redis {self.display}: {exc}") from None

    @classmethod
    async def open(cls, url: str, warn: Warn) -> Connection:
        """Connect and check that Redis answers (RedisUnavailable, one line, if not)."""
        connection = cls(url, warn)
        try:
            await connection.client.ping()
        except FAILED as exc:
            await connection.aclose()
            raise RedisUnavailable(
                f"cannot reach redis {connection.display}: {describe(exc)}"
            ) from None
        return connection

    async def aclose(self) -> None:
        with contextlib.suppress(*FAILED):
            await self.client.aclose()
