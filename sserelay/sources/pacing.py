"""When each event goes out: `--rate`, `--delay` and `--realtime`.

The Pacer only does arithmetic on times it is given; the hub sleeps. The first
event goes out at once; each later one waits `delay` seconds plus the time its
own tokens take at `rate` tokens per second. Replaying a recording
(`realtime`), every event keeps its recorded offset from the one before, the
first its offset from the start of the recording. A pacer that falls
behind its schedule (no client was listening, or the loop was busy) by more
than `catch_up` seconds starts afresh from now instead of sending a burst.

`paced()` is the one loop that applies a Pacer to a stream of batches (the hub's and the
mock's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence


class Pacer:
    """`next_time(tokens, at, now)`: when the next event is due (a time on the
    same clock as `now`). `at` is the event's recorded offset in seconds, None
    for a source without timing; only `realtime` uses it."""

    def __init__(
        self,
        *,
        rate: float | None = None,
        delay: float = 0.0,
        realtime: bool = False,
        catch_up: float = 0.25,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.rate = rate
        self.delay = delay
        self.realtime = realtime
        self.catch_up = catch_up
        self._last_due: float | None = None
        self._last_at = 0.0  # a recording starts at 0

    @property
    def active(self) -> bool:
        """Whether this pacer ever makes an event wait."""
        return self.rate is not None or self.delay > 0 or self.realtime

    def gap(self, tokens: int, at: float | None = None) -> float:
        """Seconds between the previous event and this one, ignoring lateness."""
        if self.realtime and at is not None:
            gap = max(0.0, at - self._last_at)
            self._last_at = at
            return gap
        return self.delay + (tokens / self.rate if self.rate else 0.0)

    def next_time(self, tokens: int, at: float | None, now: float) -> float:
        gap = self.gap(tokens, at)
        if self._last_due is None:
            due = now + gap if self.realtime and at is not None else now
        elif now - (self._last_due + gap) > self.catch_up:
            due = now
        else:
            due = self._last_due + gap
        self._last_due = due
        return due


#: A batch to pace: its chunks, each chunk's tokens, its recorded offset (None if untimed),
#: and what the token count holds back after each chunk (empty: nothing, ever).
Counted = tuple[Sequence[str], Sequence[int], "float | None", Sequence[int]]


async def paced(
    batches: AsyncIterable[Counted],
    pacer: Pacer | None,
    *,
    ready: Callable[[], Awaitable[object]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[tuple[Sequence[str], Sequence[int], int]]:
    """The chunks of `batches` with their tokens and what the count holds back after the
    last of them, as they may go out: each batch whole, at once, without a pacer (or an
    inactive one); one chunk at a time, each when `pacer` says, with one. `ready` is
    awaited before each paced chunk (the hub waits for a listener)."""
    if pacer is not None and not pacer.active:
        pacer = None
    async for chunks, tokens, at, pendings in batches:
        if pacer is None:
            yield chunks, tokens, pendings[-1] if pendings else 0
            continue
        for i, (chunk, n) in enumerate(zip(chunks, tokens, strict=True)):
            if ready is not None:
                await ready()
            wait = pacer.next_time(n, at, clock()) - clock()
            if wait > 0:
                await sleep(wait)
            yield [chunk], [n], pendings[i] if pendings else 0
