"""The proxy's express lane: an upstream read of whole canonical SSE events decoded, written to
the client and billed in the upstream connection's callback, with no task woken per event
(issue 17); and `Progress`, how far one proxied request got."""

from __future__ import annotations

from collections.abc import Callable

from sserelay.metering.meter import ClientMeter
from sserelay.sources.upstream import UpstreamResponse
from sserelay.streaming.relays import EventRelay, Relay
from sserelay.streaming.stream import ExpressLane


class Progress:
    """How far one request got: whether the answer's terminal payload reached the client."""

    __slots__ = ("end_delivered",)

    def __init__(self) -> None:
        self.end_delivered = False


def express_lane(
    response: UpstreamResponse,
    relay: Relay,
    client: ClientMeter,
    progress: Progress,
    record: Callable[[bytes], None] | None,
) -> Callable[[ExpressLane], None] | None:
    """What installs the express lane of an SSE answer: each upstream read of whole canonical
    events decoded, written and billed in the upstream connection's callback, as Proxy._frames()
    and the pump would, with no task woken, no future, no generator resumed, no flush awaited;
    any other read goes the pump's way. Measured on the capacity bench at 1,000 streams (issue
    17): delay p50 72-113 -> 33-56 ms, p99 225-795 -> 161-270 ms, the loop's own share of the
    profile 16 -> 11%."""
    if not isinstance(relay, EventRelay):
        return None
    event_relay = relay
    payload = relay.payload

    def install(lane: ExpressLane) -> None:
        def offer(chunk: bytes) -> bool:
            if not lane.ready():
                return False
            frames = event_relay.pass_through(chunk)
            if frames is None:
                return False
            client.update_request(model=payload.model)
            if frames.payload:
                lane.write(frames)
                progress.end_delivered = payload.done
                if record is not None:
                    record(frames.payload)
            return True

        response.express(offer)

    return install
