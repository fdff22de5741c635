"""`sserelay serve` with many clients, end to end: the real CLI, real sockets.

Broadcast, history and resume, the slow-client cut-off and its memory bound, leaks over
many connections, heartbeats, access control, chunk modes, pacing and the life cycle.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sserelay import SSEDecoder, count_tokens
from sserelay.wire.sse import Event
from tests.conftest import Relay, wait_until

READ_TIMEOUT = httpx.Timeout(10.0, read=5.0)


def events_of(response: httpx.Response) -> Iterator[Event]:
    """The events of `response`. Keep the iterator while the stream should stay open:
    once it is collected, httpx closes the connection."""
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        yield from decoder.decode(chunk)


def take(events: Iterator[Event], n: int) -> list[tuple[str | None, str]]:
    return [(e.id, e.data) for e in (next(events) for _ in range(n))]


def numbered(lines: list[str], first: int = 1) -> list[tuple[str | None, str]]:
    return [(str(i), line) for i, line in enumerate(lines, first)]


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raw_get(url: str, path: str = "/", headers: str = "") -> socket.socket:
    """A client on a bare socket: sends the request and reads nothing yet."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


# --------------------------------------------------------------------------- broadcast


def test_three_clients_late_and_resumed_receive_exactly_the_same_events(relay: Any) -> None:
    running: Relay = relay("serve", "--json")
    lines = [f"line {i} of the stream" for i in range(1, 11)]
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url) as r1:
            first = events_of(r1)
            running.feed("".join(line + "\n" for line in lines[:5]))
            assert take(first, 5) == numbered(lines[:5])
            with (
                client.stream("GET", running.url) as r2,
                client.stream("GET", running.url, headers={"Last-Event-ID": "3"}) as r3,
            ):
                late, resumed = events_of(r2), events_of(r3)
                assert take(late, 5) == numbered(lines[:5])  # the history, from event 1
                assert take(resumed, 2) == numbered(lines[3:5], 4)  # right after id 3
                running.feed("".join(line + "\n" for line in lines[5:]))
                running.stdin.close()
                rest = [[(e.id, e.data) for e in events] for events in (first, late, resumed)]
    assert rest == [numbered(lines[5:], 6)] * 3  # live: the same events, no gap, no duplicate
    bill = running.bill()
    assert running.proc.returncode == 0 and bill["reason"] == "complete"
    rows = [(c["events"], c["tokens"], c["reason"]) for c in bill["clients"]]
    tokens = [count_tokens(line) for line in lines]
    assert rows == [
        (10, sum(tokens), "complete"),
        (10, sum(tokens), "complete"),
        (7, sum(tokens[3:]), "complete"),  # billed for what it was sent, not the history
    ]
    assert bill["tokens"] == 2 * sum(tokens) + sum(tokens[3:])


def test_resume_point_in_the_query_for_eventsource(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--json")
    running.feed("a\nb\nc\n")
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url) as r:
            assert take(events_of(r), 3) == numbered(["a", "b", "c"])
        with client.stream("GET", running.url + "events?last_event_id=2") as r:
            events = events_of(r)
            assert take(events, 1) == [("3", "c")]
            running.feed("d\n")
            assert take(events, 1) == [("4", "d")]
    running.signal(signal.SIGINT)
    assert running.wait() == 130


def test_a_resume_from_beyond_the_history_is_marked_truncated(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--history", "2")
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url) as r:
            events = events_of(r)
            for i in range(1, 6):  # one read each, so old batches can be dropped
                running.feed(f"e{i}\n")
                assert take(events, 1) == [(str(i), f"e{i}")]
        with client.stream("GET", running.url, headers={"Last-Event-ID": "1"}) as r:
            raw = r.iter_raw()
            seen = b""
            while b"id: 5" not in seen:
                seen += next(raw)
    assert seen.startswith(b": history truncated\n\n")
    assert [(e.id, e.data) for e in SSEDecoder().decode(seen)] == [("4", "e4"), ("5", "e5")]
    running.signal(signal.SIGTERM)
    assert running.wait() == 143


def test_a_resume_after_the_end_of_a_finished_stream_gets_204(relay: Any, tmp_path: Path) -> None:
    source = tmp_path / "s.txt"
    source.write_text("a\nb\n")
    running: Relay = relay("serve", str(source), "--keep")
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url) as r:
            assert len(list(events_of(r))) == 2
        assert client.get(running.url, headers={"Last-Event-ID": "2"}).status_code == 204
        with client.stream("GET", running.url, headers={"Last-Event-ID": "1"}) as r:
            assert [(e.id, e.data) for e in events_of(r)] == [("2", "b")]
    running.signal(signal.SIGINT)
    assert running.wait() == 130


# --------------------------------------------------------------------------- slow clients


def test_a_client_that_never_reads_is_cut_off_and_memory_stays_bounded(
    relay: Any, tmp_path: Path
) -> None:
    """A bare socket stops reading after the first event; a fast client reads 400,000
    events (about 21 MB) meanwhile. The slow one is reset and billed as slow_client, the fast
    one gets every event, and the relay's memory never grows with the data."""
    count = 400_000
    running: Relay = relay("serve", "--json", "--quiet", "--history", "1000", "--max-lag", "1000")
    pid = running.proc.pid
    peak = [rss_kib(pid)]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            try:
                peak.append(rss_kib(pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            sampling.wait(0.02)

    def produce() -> None:
        line = "x" * 40 + "\n"  # 41 bytes a line, about 53 on the wire
        for start in range(2, count + 1, 10_000):
            running.feed(line * min(10_000, count + 1 - start))
        running.stdin.close()

    pattern = re.compile(rb"id: (\d+)\n")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as fast:
        running.feed("first\n")
        raw = fast.iter_raw()
        received = next(raw)
        slow = raw_get(running.url)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        read_until(slow, b"data: first\n\n")  # it is connected; from now on it reads nothing
        threading.Thread(target=sample, daemon=True).start()
        threading.Thread(target=produce, daemon=True).start()
        started = time.monotonic()
        ids: list[int] = []
        tail = received
        for chunk in raw:
            data = tail + chunk
            cut = data.rfind(b"\n\n") + 2
            ids += [int(m) for m in pattern.findall(data, 0, cut)]
            tail = data[cut:]
        elapsed = time.monotonic() - started
    sampling.set()
    assert ids == list(range(1, count + 1))  # the fast client got every event, in order
    with pytest.raises((ConnectionResetError, TimeoutError)):
        slow.settimeout(5)
        while slow.recv(1 << 20):  # what the kernel held for it, then the reset
            pass
    slow.close()
    bill = running.bill(timeout=20)
    fast_row, slow_row = bill["clients"]
    assert (bill["reason"], fast_row["reason"], slow_row["reason"]) == (
        "complete",
        "complete",
        "slow_client",
    )
    assert fast_row["events"] == count
    assert slow_row["events"] < count - 1000
    growth_mib = (max(peak) - peak[0]) / 1024
    print(
        f"\nslow client: cut after {slow_row['events']} events, {slow_row['duration_s']:.2f} s; "
        f"fast client: {count} events in {elapsed:.2f} s; "
        f"RSS {peak[0] / 1024:.0f} MiB at start, peak {max(peak) / 1024:.0f} MiB"
    )
    # The bound: 21 MB went through; the process grew by well under half of that.
    assert growth_mib < 12, f"RSS grew by {growth_mib:.1f} MiB"
    assert max(peak) / 1024 < 100


# --------------------------------------------------------------------------- leaks


def debug_tasks(relay: Relay) -> int:
    """The relay's live task count (SSERELAY_DEBUG_TASKS=1 prints it on SIGUSR1)."""
    seen = len(relay.stderr_lines)
    relay.signal(signal.SIGUSR1)
    wait_until(lambda: any("debug:" in line for line in relay.stderr_lines[seen:]), timeout=5)
    line = next(line for line in relay.stderr_lines[seen:] if "debug:" in line)
    match = re.search(r"debug: (\d+) tasks", line)
    assert match is not None
    return int(match.group(1))


def test_500_connect_and_disconnect_cycles_leak_no_fds_or_tasks(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--quiet", env={"SSERELAY_DEBUG_TASKS": "1"})
    running.feed("hello there\n")
    pid = running.proc.pid

    def cycle(i: int) -> None:
        sock = raw_get(running.url)
        read_until(sock, b"data: hello there\n\n")
        if i % 2:  # half hang up with a reset, half with a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    cycle(0)  # the first client starts the reader task: it is part of the baseline
    readings = [(open_fds(pid), debug_tasks(running))]

    def settled() -> bool:  # its connection and task are gone: two readings, apart, agree
        readings.append((open_fds(pid), debug_tasks(running)))
        return readings[-1] == readings[-2]

    wait_until(settled, timeout=5, interval=0.05)
    fds, tasks = readings[-1]
    started = time.monotonic()
    for i in range(1, 501):
        cycle(i)
    elapsed = time.monotonic() - started
    wait_until(lambda: open_fds(pid) <= fds, timeout=5)
    wait_until(lambda: debug_tasks(running) <= tasks, timeout=5, interval=0.1)
    assert (open_fds(pid), debug_tasks(running)) == (fds, tasks)
    print(f"\n500 cycles in {elapsed:.2f} s; fds {fds} -> {open_fds(pid)}, tasks {tasks}")
    running.signal(signal.SIGINT)
    assert running.wait() == 130


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_arrive_at_the_configured_interval_on_an_idle_stream(relay: Any) -> None:
    running: Relay = relay("serve", "--heartbeat", "0.2")
    times: list[float] = []
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        raw = r.iter_raw()
        running.feed("hello\n")
        seen = b""
        while seen.count(b": ping\n\n") < 5:
            chunk = next(raw)
            seen += chunk
            times += [time.monotonic()] * chunk.count(b": ping\n\n")
        running.stdin.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.15 < gap < 0.6 for gap in gaps), gaps
    # issue 18: the first event carries `retry:`, so a browser reconnects promptly
    assert seen.startswith(b"retry: 1000\nid: 1\ndata: hello\n\n")


# --------------------------------------------------------------------------- access


def test_auth_token_refuses_without_or_with_a_wrong_token_and_bills_nobody_refused(
    relay: Any, tmp_path: Path
) -> None:
    source = tmp_path / "s.txt"
    source.write_text("one two\n")
    env = {"SSERELAY_AUTH_TOKEN": "s3cret-token"}
    running: Relay = relay("serve", str(source), "--json", "--keep", env=env)
    url = running.url
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        refused = [
            client.get(url),
            client.get(url, headers={"Authorization": "Bearer wrong"}),
            client.get(url, headers={"Authorization": "Basic s3cret-token"}),
            client.get(url + "?token=wrong"),
            client.get(url + "?token=s3cret-toke"),
        ]
        assert [r.status_code for r in refused] == [401] * 5
        assert refused[0].headers["www-authenticate"] == "Bearer"
        accepted = [
            client.get(url, headers={"Authorization": "Bearer s3cret-token"}),
            client.get(url, headers={"Authorization": "bearer s3cret-token"}),
            client.get(url, params={"token": "s3cret-token"}),
        ]
        assert [r.status_code for r in accepted] == [200] * 3
        assert all(r.text == "retry: 1000\nid: 1\ndata: one two\n\n" for r in accepted)
    running.signal(signal.SIGINT)
    bill = running.bill()
    assert [(c["reason"], c["tokens"]) for c in bill["clients"]] == [("complete", 2)] * 3
    assert bill["tokens"] == 6
    assert "s3cret" not in running.stderr + json.dumps(bill)


def test_max_clients_answers_503_beyond_and_bills_nobody_refused(relay: Any) -> None:
    running: Relay = relay("serve", "--json", "--max-clients", "1")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        running.feed("x\n")
        assert take(events, 1) == [("1", "x")]
        refused = client.get(running.url)
        assert refused.status_code == 503
        assert "too many clients" in refused.text
        running.stdin.close()
    assert len(running.bill()["clients"]) == 1


def test_cors_origin(relay: Any, tmp_path: Path) -> None:
    source = tmp_path / "s.txt"
    source.write_text("a\n")
    plain: Relay = relay("serve", str(source))
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        assert "access-control-allow-origin" not in client.get(plain.url).headers
    cors: Relay = relay("serve", str(source), "--cors-origin", "https://app.example")
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        preflight = client.options(
            cors.url,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        response = client.get(cors.url)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers["content-type"] == "text/event-stream"


# --------------------------------------------------------------------------- chunk modes, pacing


def test_chunk_raw_sends_each_read_as_one_event_whatever_it_holds(relay: Any) -> None:
    running: Relay = relay("serve", "--chunk", "raw", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        raw = r.iter_raw()
        running.feed("a\n\ndata: evil")
        wire = next(raw)
        assert wire == b"retry: 1000\nid: 1\ndata: a\ndata: \ndata: data: evil\n\n"
        (event,) = SSEDecoder().decode(wire)
        assert (event.id, event.data, event.event) == ("1", "a\n\ndata: evil", None)
        running.feed(" to")  # a word split across two reads is one token
        assert next(raw) == b"id: 2\ndata:  to\n\n"
        running.feed("ken two")
        assert next(raw) == b"id: 3\ndata: ken two\n\n"
        running.stdin.close()
    bill = running.bill()
    assert bill["events"] == 3
    assert bill["tokens"] == count_tokens("a\n\ndata: evil" + " to" + "ken two") == 5


def test_chunk_word_sends_words_with_their_leading_whitespace(relay: Any) -> None:
    running: Relay = relay("serve", "--chunk", "word", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        running.feed("Hello wor")
        assert take(events, 1) == [("1", "Hello")]
        running.feed("ld,\n  again\n")
        assert take(events, 2) == [("2", " world,"), ("3", "\n  again")]
        running.stdin.close()
        assert list(events) == []
    assert running.bill()["tokens"] == 3


def test_rate_paces_events_one_by_one(relay: Any, tmp_path: Path) -> None:
    source = tmp_path / "s.txt"
    source.write_text("".join(f"w{i}\n" for i in range(20)))
    running: Relay = relay("serve", str(source), "--rate", "50", "--json")
    times = []
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        for _ in events_of(r):
            times.append(time.monotonic())
    assert len(times) == 20
    assert 19 / 50 * 0.8 < times[-1] - times[0] < 19 / 50 * 3  # 0.38 s at 50 tokens/s
    assert running.bill()["tokens"] == 20


# --------------------------------------------------------------------------- life cycle


def test_keep_pauses_the_source_while_nobody_listens_and_loses_nothing(relay: Any) -> None:
    running: Relay = relay("serve", "--keep", "--json", "--quiet")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        running.feed("before\n")
        assert take(events_of(r), 1) == [("1", "before")]
    # Nobody listens: the producer is held back by the pipe, not drained into memory.
    os.set_blocking(running.stdin.fileno(), False)
    line = b"y" * 99 + b"\n"
    written = 0
    with pytest.raises(BlockingIOError):
        while written < 64 * 1024 * 1024:
            written += os.write(running.stdin.fileno(), line * 100)
    assert written < 2 * 1024 * 1024
    os.set_blocking(running.stdin.fileno(), True)
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url, headers={"Last-Event-ID": "1"}) as r:
            events = events_of(r)
            got = [next(events) for _ in range(written // 100)]
    assert [e.id for e in got] == [str(i) for i in range(2, written // 100 + 2)]
    running.signal(signal.SIGINT)
    assert running.wait() == 130


def test_the_run_ends_with_the_last_client_that_leaves_before_the_end(relay: Any) -> None:
    running: Relay = relay("serve", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with client.stream("GET", running.url) as r1:
            first = events_of(r1)
            running.feed("a\n")
            assert take(first, 1) == [("1", "a")]
            with client.stream("GET", running.url) as r2:
                second = events_of(r2)
                assert take(second, 1) == [("1", "a")]
            time.sleep(0.2)
            assert running.proc.poll() is None  # one client is still there
    assert running.wait() == 3
    bill = json.loads(running.stdout())
    assert bill["reason"] == "client_disconnected"
    assert [c["reason"] for c in bill["clients"]] == ["client_disconnected"] * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--history", "100", "--max-lag", "10"], "less than --history 100"),
        (["--realtime"], "plain text, which has none"),
        (["--realtime", "--rate", "5"], "drop --rate and --delay"),
        (["--chunk", "para"], "'para' is not one of"),
        (["--auth-token", " "], "the token is empty"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sserelay", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert message in result.stderr
