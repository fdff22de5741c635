"""Which instances sharing a ledger are alive, by heartbeats in Redis.

Each instance that writes to a ledger beats every `interval` seconds in one sorted set per
ledger; one that has not beaten for `dead_after` seconds is taken out of the set by the
first survivor to see it (the `BEAT` script is atomic), which then closes that instance's
open ledger rows as `crashed` (`on_dead`). That is seconds after a `kill -9`, where the
ledger's own heartbeats need its `dead_after` (10 s or more) and a recovery round. An
instance that stops cleanly leaves the set itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

from .connection import FAILED, Connection, check_cancelled
from .keys import instances
from .scripts import BEAT

#: Seconds between heartbeats, and without one before an instance is dead.
INTERVAL = 0.5
DEAD_AFTER = 3.0


class Presence:
    """This instance's heartbeat for `ledger` (its display), and what it does about the
    dead ones it finds: `on_dead(instances)`."""

    def __init__(
        self,
        connection: Connection,
        ledger: str,
        instance: str,
        on_dead: Callable[[Sequence[str]], Awaitable[object]],
        *,
        interval: float = INTERVAL,
        dead_after: float = DEAD_AFTER,
    ) -> None:
        self._connection = connection
        self._key = instances(ledger)
        self._instance = instance
        self._on_dead = on_dead
        self._interval = interval
        self._dead_after = dead_after
        self._task: asyncio.Task[None] | None = None
        #: instances this one found dead and recovered
        self.recovered: list[str] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        script = self._connection.client.register_script(BEAT)
        while True:
            try:
                dead = await script(
                    keys=[self._key], args=[self._instance, int(self._dead_after * 1000)]
                )
            except FAILED as exc:
                check_cancelled()
                self._connection.health.lost(exc)
            else:
                check_cancelled()
                self._connection.health.ok()
                names = [name.decode() for name in dead]
                if names:
                    await self._on_dead(names)
                    self.recovered += names
            await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        """Stop beating and leave the set (a clean exit is not a death)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*FAILED):
            await self._connection.client.zrem(self._key, self._instance)
