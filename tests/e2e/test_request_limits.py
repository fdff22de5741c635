"""Request heads are bounded: hostile ones get 414/431 and a close, memory stays put,
and a head that never ends is timed out (issue 10, item 3).

The bounds are checked black-box, on the real CLI and real sockets, with the relay's
RSS read from /proc, at their defaults and as --max-line-bytes, --max-head-bytes,
--max-headers, --head-timeout and --max-body-bytes set them. The timeout also runs
in-process: serve_app() (the server the CLI runs) with a short head timeout around an app
that streams, to show that established streams and keep-alive never feel it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from sserelay.http import server
from sserelay.http.limits import RequestLimits
from tests.conftest import Relay

MIB = 1024 * 1024
#: RSS may move a little (allocator arenas, one read buffer); before the bounds one
#: hostile head grew it by its own size (32 MiB here) or ten times that.
RSS_SLACK = 4 * MIB


def rss(pid: int) -> int:
    """The resident set size of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc status")


def address(relay: Relay) -> tuple[str, int]:
    match = re.match(r"http://([^/:]+):(\d+)/", relay.url)
    assert match is not None
    return match.group(1), int(match.group(2))


def send_head(where: tuple[str, int], start: bytes, filler: bytes, total: int) -> bytes:
    """Send `start` then `filler` repeated up to `total` bytes on one connection while
    reading the answer; return everything read until the server closed (EOF)."""
    with socket.create_connection(where, timeout=10) as conn:

        def send() -> None:
            # The server may close before the last byte: that is the point.
            try:
                conn.sendall(start)
                for _ in range(total // len(filler)):
                    conn.sendall(filler)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while chunk := conn.recv(65536):  # a timeout fails the test: no answer, no close
            answer += chunk
        sender.join(timeout=10)
        return answer


HOSTILE_HEADS = {
    "a 32 MiB request line": (b"GET /", b"a" * 65536, 414),
    "one 32 MiB header value": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 65536, 431),
    "32 MiB of small header lines": (b"GET / HTTP/1.1\r\nHost: x\r\n", b"X-A: b\r\n" * 8192, 431),
}


@pytest.mark.parametrize(("start", "filler", "status"), HOSTILE_HEADS.values(), ids=HOSTILE_HEADS)
def test_a_hostile_head_is_refused_closed_and_costs_no_memory(
    relay: Any, start: bytes, filler: bytes, status: int
) -> None:
    running: Relay = relay("serve", "--keep", "--quiet")
    assert httpx.get(running.url + "healthz").text == "ok\n"  # warm: the code paths are loaded
    before = rss(running.proc.pid)
    answer = send_head(address(running), start, filler, 32 * MIB)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in head
    assert body.startswith(b"sserelay: ")
    growth = rss(running.proc.pid) - before
    assert growth < RSS_SLACK, f"RSS grew by {growth / MIB:.1f} MiB"
    # The relay is unharmed.
    assert httpx.get(running.url + "healthz").text == "ok\n"
    assert "Traceback" not in running.stderr


DEFAULTS = RequestLimits()


def test_heads_within_the_bounds_are_served(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--quiet")
    long_query = "x=" + "q" * (DEFAULTS.line_bytes - 200)
    assert httpx.get(f"{running.url}healthz?{long_query}").status_code == 200
    big = {"X-Big": "v" * (DEFAULTS.line_bytes - 100)}
    assert httpx.get(running.url + "healthz", headers=big).status_code == 200
    many = {f"X-H{i}": "v" * 100 for i in range(DEFAULTS.headers - 10)}
    assert httpx.get(running.url + "healthz", headers=many).status_code == 200


def test_a_header_over_its_own_bound_is_431_within_the_total(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--quiet")
    big = {"X-Big": "v" * (DEFAULTS.line_bytes + 1)}
    response = httpx.get(running.url + "healthz", headers=big)
    assert response.status_code == 431
    assert response.headers["connection"] == "close"


# --------------------------------------------------------------------------- the head timeout

TIMEOUT = 0.3
EVENTS = 8  # one every TIMEOUT / 2: the stream outlives the timeout several times over


async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
    """`/stream`: EVENTS events, TIMEOUT / 2 apart; anything else: `ok`."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] != "/stream":
        await send({"type": "http.response.body", "body": b"ok"})
        return
    for i in range(EVENTS):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        await asyncio.sleep(TIMEOUT / 2)
    await send({"type": "http.response.body", "body": b""})


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One chunked response's body (its head skipped)."""
    await reader.readuntil(b"\r\n\r\n")
    body = b""
    while size := int((await reader.readline()).strip(), 16):
        body += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return body


def test_an_unfinished_head_is_closed_after_the_timeout_and_streams_are_not() -> None:
    async def scenario() -> None:
        sock = server.listen("127.0.0.1", 0)
        port = sock.getsockname()[1]
        finished = asyncio.Event()
        serving = asyncio.create_task(
            server.serve_app(
                streaming_app,
                sock,
                finished=finished,
                on_signal=lambda _: None,
                limits=RequestLimits(head_timeout=TIMEOUT),
            )
        )
        connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        (silent, _), (half, half_w), (live, live_w) = connections
        try:
            started = time.monotonic()
            half_w.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            live_w.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            # Both end (EOF) once the timeout has passed; the stream goes on meanwhile.
            assert await half.read() == b""
            assert await silent.read() == b""
            assert time.monotonic() - started >= TIMEOUT * 0.9
            body = await read_response(live)
            assert body == b"".join(b"data: %d\n\n" % i for i in range(EVENTS))
            # Keep-alive: idle longer than the head timeout (shorter than uvicorn's
            # keep-alive), the connection still takes the next request.
            await asyncio.sleep(TIMEOUT * 2)
            live_w.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_response(live) == b"ok"
        finally:
            for _, writer in connections:
                writer.close()
                await writer.wait_closed()
            finished.set()
            await serving
            sock.close()

    async def bounded() -> None:
        async with asyncio.timeout(10):
            await scenario()

    asyncio.run(bounded())


# --------------------------------------------------------------------------- set by options


def test_the_options_set_each_bound(relay: Any) -> None:
    running: Relay = relay(
        "serve", "--keep", "--quiet", "--max-line-bytes", "1000", "--max-head-bytes", "2500",
        "--max-headers", "8",
    )  # fmt: skip
    url = running.url + "healthz"
    # httpx sends 5 headers of its own (host, accept, accept-encoding, connection, user-agent)
    assert httpx.get(url, headers={f"X-H{i}": "v" for i in range(3)}).status_code == 200
    assert httpx.get(f"{url}?{'q' * 1100}").status_code == 414
    assert httpx.get(url, headers={"X-Big": "v" * 1000}).status_code == 431
    assert httpx.get(url, headers={f"X-H{i}": "v" for i in range(6)}).status_code == 431
    lines = {f"X-H{i}": "v" * 900 for i in range(3)}  # each line within 1000, 2700 in all
    assert httpx.get(url, headers=lines).status_code == 431
    assert "Traceback" not in running.stderr


def test_head_timeout_closes_a_half_sent_head_on_the_command_line(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--quiet", "--head-timeout", "0.3")
    started = time.monotonic()
    with socket.create_connection(address(running), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert conn.recv(1024) == b""  # closed, unanswered
    assert 0.25 <= time.monotonic() - started < 5


def test_a_body_over_max_body_bytes_is_413_in_the_apis_shape(relay: Any, tmp_path: Any) -> None:
    answer = tmp_path / "answer.txt"
    answer.write_text("hello\n")
    running: Relay = relay(
        "serve", str(answer), "--as", "openai", "--quiet", "--no-ledger", "--max-body-bytes", "500",
    )  # fmt: skip
    url = running.url + "v1/chat/completions"
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=small).status_code == 200
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 600}]}
    response = httpx.post(url, json=big)
    assert response.status_code == 413
    assert "500 bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--max-line-bytes", "70000"], "--max-line-bytes"),
        (["--max-headers", "0"], "--max-headers"),
        (["--head-timeout", "0"], "--head-timeout"),
        (["--max-body-bytes", "-1"], "--max-body-bytes"),
    ],
)
def test_a_bad_bound_is_a_usage_error_naming_its_option(args: list[str], option: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sserelay", "serve", "--quiet", *args, "-"],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert option in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
