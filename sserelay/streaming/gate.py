"""`BudgetGate`: what a stream may still deliver under its key's budget, checked before
each write.

The relay never delivers more tokens than a key has left: before a Frames is written, the
tokens it would add to the bill (its counted tokens, and the change in what a BPE count
holds back) are taken from the stream's `Allowance`. A Frames that does not fit is not
written at all; the stream is then cut with one last event in its API's streaming shape
(`error_event`), which says why, and its response ends cleanly. The cut falls between two
writes (one upstream read), so a stream may stop a few tokens short of the budget, never
past it; a hub batch that does not fit gives the events of it that do (`part_that_fits`),
where the count holds nothing back (every tokenizer but a BPE one). A shared store that is
lost fails closed: a stream goes on within what its instance holds, and is cut when that is
spent, with an event that says why.
"""

from __future__ import annotations

from sserelay.metering.budget import Allowance
from sserelay.metering.meter import ClientMeter
from sserelay.streaming.log import BatchFrames
from sserelay.wire.frames import Frames


class BudgetGate:
    """Checks each Frames of one stream against `allowance`. `price_per_token` is the cost
    of one output token for the stream's model (0 where unpriced), for a cost budget."""

    __slots__ = ("_allowance", "_client", "_price", "_unavailable", "error_event", "exhausted")

    def __init__(
        self,
        allowance: Allowance,
        client: ClientMeter,
        *,
        price_per_token: float,
        error_event: bytes,
        unavailable_event: bytes | None = None,
    ) -> None:
        self._allowance = allowance
        self._client = client
        self._price = price_per_token
        #: what the stream ends with once the budget is spent (an error in its API's shape)
        self.error_event = error_event
        #: ... or once its reservation is spent while the shared budget store is lost
        self._unavailable = unavailable_event
        #: set once a Frames did not fit: the stream ends after the error event
        self.exhausted = False

    def _need(self, item: Frames) -> int:
        # What the bill would grow by: the new tokens, and what the count holds back now
        # instead of before (a BPE tail can shrink as it is counted).
        return max(0, item.tokens + item.pending - self._client.tail)

    def take(self, item: Frames) -> bool:
        """The per-event path: True if `item` fits in what this process holds (no waiting)."""
        need = self._need(item)
        return not need or self._allowance.try_take(need, need * self._price)

    async def admit(self, item: Frames) -> bool:
        """The slow path, after `take` said no: ask the budget's store for more. False (and
        `exhausted` set) if the key's budget cannot cover `item`."""
        need = self._need(item)
        cost = need * self._price
        if await self._allowance.refill(need, cost) and self._allowance.try_take(need, cost):
            return True
        self.exhausted = True
        if self._unavailable is not None and not self._allowance.reachable:
            self.error_event = self._unavailable  # not spent: it cannot be granted more now
        return False

    async def part_that_fits(self, item: Frames) -> Frames | None:
        """After `admit` said no: the most first events of `item` that the key's budget
        can take (taken), if `item` is a hub batch's and the count holds nothing back after
        any event (pending 0); else None. A store grants all or nothing, so the events that
        fit are found by halving: a few calls to the store, once, when the stream is cut."""
        if not isinstance(item, BatchFrames) or item.pending or self._client.tail:
            return None
        best: Frames | None = None
        low, high = 0, item.events - 1  # all of them did not fit
        while low < high:
            count = (low + high + 1) // 2
            part = item.head(count)
            if await self._allowance.refill(part.tokens, part.tokens * self._price):
                low, best = count, part
            else:
                high = count - 1
        if best is None or not self._allowance.try_take(best.tokens, best.tokens * self._price):
            return None
        return best
