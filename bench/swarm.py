"""Many streaming clients in a process of their own: the load of the capacity figures.

    python bench/swarm.py --port P [--post PATH --body JSON | --get PATH]
                          --stamp content|seq --samples FILE

Driven by lines on stdin, answered by lines on stdout:

- `connect K`: open K more streams (100 at a time, each waiting for its
  response head) -> `connected TOTAL FAILED`.
- `measure T0 T1`: record the delay of every event received in [T0, T1)
  (time.monotonic_ns(); the clock is shared by every process on the host) ->
  `measuring` at once (armed: start the source now), then, at T1 or once
  every stream has ended, `result {JSON}`; the delays, in ns, go to FILE as
  native int64s.
- EOF: close every stream and exit.

An event's delay is its receive time minus the stamp inside it: `--stamp
content` reads the OpenAI-style content (` NS`, bench/upstream.py),
`--stamp seq` the `data: SEQ NS` of bench/producer.py. Light on purpose: the
HTTP parsing is loadgen.SSEClient's (one Protocol per connection, uvloop) and
the events of a read are found by one regex scan, not a Python loop per line.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import re
import sys
import time

from loadgen import SSEClient

STAMPS = {
    # A proxy may re-serialize the JSON: `"content": " 123"` as well as `"content":" 123"`.
    "content": re.compile(rb'"content"\s*:\s*"\s*(\d+)'),
    "seq": re.compile(rb"data: \d+ (\d+)"),
}


class Window:
    """What every client records into: delays of events received in [start, end)."""

    def __init__(self) -> None:
        self.start = 1 << 62  # nothing is recorded before `measure`
        self.end = 1 << 62
        self.delays = array.array("q")
        self.events = 0  # every stamped event, in the window or not


class Client(SSEClient):
    """An SSEClient whose stamped events are found with one regex per read."""

    def __init__(
        self, host: str, port: int, request: bytes, stamp: re.Pattern[bytes], window: Window
    ) -> None:
        super().__init__(host, port, stamped=True)
        self.request = request
        self._stamp = stamp
        self._window = window

    def _stamped_events(self, piece: bytes, now: int) -> None:
        text = self._text + piece if self._text else piece
        # Only whole events: a stamp cut by a read boundary would read as a wrong number.
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self._text = text
            return
        self._text = text[cut + 2 :]
        stamps = self._stamp.findall(text, 0, cut)
        if not stamps:
            return
        window = self._window
        window.events += len(stamps)
        stats = self.stats
        stats.events += len(stamps)
        stats.last_event_ns = now
        if stats.first_event_ns is None:
            stats.first_event_ns = now
            self.first_event.set_result(None)
        if window.start <= now < window.end:
            window.delays.extend(now - int(stamp) for stamp in stamps)


class Swarm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.clients: list[Client] = []
        self.failed = 0
        self.window = Window()
        self._events_before = 0
        self.stamp = STAMPS[args.stamp]
        host = f"{args.host}:{args.port}"
        extra = "".join(f"{header}\r\n" for header in args.header)
        if args.post is not None:
            body = args.body.encode()
            self.request = (
                f"POST {args.post} HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body
        else:
            self.request = (
                f"GET {args.get} HTTP/1.1\r\nHost: {host}\r\n"
                f"Accept: text/event-stream\r\n{extra}\r\n"
            ).encode()

    async def connect(self, count: int, timeout: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(100)  # no listen backlog overflows
        deadline = time.monotonic() + timeout

        async def one() -> None:
            async with gate:
                client = Client(
                    self.args.host, self.args.port, self.request, self.stamp, self.window
                )
                try:
                    await loop.create_connection(lambda: client, self.args.host, self.args.port)
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(asyncio.shield(client.headers_received), left)
                except Exception:
                    client.close()
                    self.failed += 1
                    return
                self.clients.append(client)

        await asyncio.gather(*(one() for _ in range(count)))

    def arm(self, start_ns: int, end_ns: int) -> None:
        """Record from now on what arrives in [start_ns, end_ns)."""
        window = self.window
        window.delays = array.array("q")
        window.start, window.end = start_ns, end_ns
        self._events_before = window.events

    async def measure(self, start_ns: int, end_ns: int) -> dict[str, float]:
        window = self.window
        events_before = self._events_before
        left = max(0.0, (end_ns - time.monotonic_ns()) / 1e9)
        if self.clients:
            # Until the window ends, or every stream has (a failed one just ends short).
            await asyncio.wait([c.done for c in self.clients], timeout=left)
        else:
            await asyncio.sleep(left)
        finished_ns = min(time.monotonic_ns(), end_ns)
        window.end = finished_ns  # nothing after this moment counts
        with open(self.args.samples, "wb") as out:
            window.delays.tofile(out)
        return {
            "streams": len(self.clients),
            "ended": sum(1 for c in self.clients if c.done.done()),
            "samples": len(window.delays),
            "events_total": window.events - events_before,
            "seconds": (finished_ns - start_ns) / 1e9,
            # When the last event arrived: the end of the busy part, not of the shutdown.
            "last_event_ns": max((c.stats.last_event_ns or 0 for c in self.clients), default=0),
        }

    def close(self) -> None:
        for client in self.clients:
            client.close()


async def drive(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    swarm = Swarm(args)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        while line := await reader.readline():
            command, *rest = line.decode().split()
            if command == "connect":
                await swarm.connect(int(rest[0]))
                say(f"connected {len(swarm.clients)} {swarm.failed}")
            elif command == "measure":
                start_ns, end_ns = int(rest[0]), int(rest[1])
                swarm.arm(start_ns, end_ns)
                # Armed: the parent may start the source now, no first event is missed.
                say("measuring")
                result = await swarm.measure(start_ns, end_ns)
                say("result " + json.dumps(result))
    finally:
        swarm.close()
        await asyncio.sleep(0.1)  # let the transports send their FINs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--get", default="/", help="GET this path (the default)")
    parser.add_argument("--post", help="POST to this path instead, with --body")
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--stamp", choices=sorted(STAMPS), required=True)
    parser.add_argument("--samples", required=True, help="where the delays go")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(drive(args))
    else:
        uvloop.run(drive(args))


if __name__ == "__main__":
    main()
