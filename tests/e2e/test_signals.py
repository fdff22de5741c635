"""The bill holds under signals (issue 10, items 1 and 2).

Many clients mid-stream, then SIGTERM or SIGINT: each client's bill row equals what it
received when it got the clean end of its stream, and is at least what it received (of
which what it received is a prefix) when its stream was cut. Repeated, to catch races.
A run with a client that never reads still ends, within a documented bound, and a client
that comes during the shutdown gets 503, not a stream that never ends.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sserelay.http.endpoint import SHUTDOWN_GRACE
from tests.conftest import Relay

CLIENTS = 100
ROUNDS = 3


@dataclass
class Received:
    peer: str
    body: bytes
    clean: bool

    @property
    def events(self) -> int:
        return sum(1 for block in self.body.split(b"\n\n")[:-1] if b"data:" in block)


async def read_stream(
    client: httpx.AsyncClient, method: str, url: str, started: asyncio.Event, **kwargs: Any
) -> Received:
    body = bytearray()
    clean = True
    async with client.stream(method, url, **kwargs) as response:
        host, port = response.extensions["network_stream"].get_extra_info("client_addr")
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                started.set()
        except httpx.RemoteProtocolError:  # cut, not ended
            clean = False
    return Received(f"{host}:{port}", bytes(body), clean)


async def many_then_signal(
    running: Relay, method: str, url: str, signum: int, **kwargs: Any
) -> list[Received]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        started = [asyncio.Event() for _ in range(CLIENTS)]
        readers = [
            asyncio.create_task(read_stream(client, method, url, began, **kwargs))
            for began in started
        ]
        await asyncio.wait_for(asyncio.gather(*(began.wait() for began in started)), 20)
        await asyncio.sleep(0.2)  # everyone mid-stream
        running.signal(signum)
        return await asyncio.wait_for(asyncio.gather(*readers), 20)


def check_rows(received: list[Received], bill: dict[str, Any]) -> None:
    rows = {row["peer"]: row for row in bill["clients"]}
    assert len(rows) == len(received) == CLIENTS
    for got in received:
        row = rows[got.peer]
        if got.clean:  # got the clean end: billed exactly what it received
            assert (row["bytes"], row["events"]) == (len(got.body), got.events), got.peer
        else:  # cut: billed at least what it received
            assert row["bytes"] >= len(got.body) and row["events"] >= got.events, got.peer


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_bills_every_client_exactly_under_a_signal(
    relay: Any, tmp_path: Path, signum: int
) -> None:
    source = tmp_path / "long.txt"
    source.write_text("".join(f"line {i} with a few words\n" for i in range(100_000)))
    for _ in range(ROUNDS):
        running: Relay = relay(
            "serve", str(source), "--keep", "--delay", "0.001", "--heartbeat", "0", "--json"
        )
        received = asyncio.run(many_then_signal(running, "GET", running.url, signum))
        bill = running.bill(timeout=20)
        assert running.proc.returncode == (143 if signum == signal.SIGTERM else 130)
        assert all(got.clean for got in received)  # an interrupted serve ends each stream
        assert all(row["reason"] == "interrupted" for row in bill["clients"])
        check_rows(received, bill)


class StreamingUpstream:
    """Answers every request with an OpenAI-style SSE stream, an event every 2 ms, until
    the proxy closes the connection. One asyncio loop in a thread; many at once."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._answer, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.server = server
        self.ready.set()
        self.loop.run_forever()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            n = 0
            while True:
                n += 1
                chunk = {"choices": [{"index": 0, "delta": {"content": f" word{n}"}}]}
                event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(0.002)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stop(self) -> None:
        self.server.close()
        current = asyncio.current_task()
        for task in [t for t in asyncio.all_tasks() if t is not current]:
            task.cancel()
        await self.server.wait_closed()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def streaming_upstream() -> Iterator[StreamingUpstream]:
    upstream = StreamingUpstream()
    yield upstream
    upstream.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_proxy_bills_every_request_exactly_under_a_signal(
    relay: Any, streaming_upstream: StreamingUpstream, signum: int
) -> None:
    upstream = f"http://127.0.0.1:{streaming_upstream.port}/v1"
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(ROUNDS):
        running: Relay = relay("proxy", "--upstream", upstream, "--heartbeat", "0", "--json")
        url = running.url + "chat/completions"
        received = asyncio.run(many_then_signal(running, "POST", url, signum, json=body))
        bill = running.bill(timeout=20)
        assert running.proc.returncode == (143 if signum == signal.SIGTERM else 130)
        assert all(row["reason"] == "interrupted" for row in bill["clients"])
        check_rows(received, bill)


def test_a_run_with_a_client_that_never_reads_ends_within_the_bound(
    relay: Any, tmp_path: Path
) -> None:
    source = tmp_path / "wide.txt"
    source.write_text("".join(f"{i} {'x' * 2000}\n" for i in range(20_000)))
    running: Relay = relay(
        "serve", str(source), "--keep", "--max-lag", "100000", "--history", "100000", "--json"
    )
    host, port = running.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, int(port)))
    stuck.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    try:
        time.sleep(0.5)  # its socket fills: the stream is stuck in a write
        began = time.monotonic()
        running.signal(signal.SIGTERM)
        time.sleep(0.2)
        # A client that comes now is told the relay is shutting down, not given a stream.
        late = httpx.get(running.url, timeout=5)
        assert late.status_code == 503
        assert "shutting down" in late.text
        bill = running.bill(timeout=SHUTDOWN_GRACE + 5)
        took = time.monotonic() - began
    finally:
        stuck.close()
    assert running.proc.returncode == 143
    assert took < SHUTDOWN_GRACE + 1.5, took
    assert [row["reason"] for row in bill["clients"]] == ["interrupted"]
