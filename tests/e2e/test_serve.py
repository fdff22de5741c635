"""`sserelay serve` end to end: the real CLI on a free port, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from sserelay import SSEDecoder, count_tokens
from sserelay.wire.sse import Event
from tests.conftest import EXAMPLE, Relay, require_tool, wait_until

EXIT_DISCONNECTED = 3
EXIT_INPUT_ERROR = 5
READ_TIMEOUT = httpx.Timeout(10.0, read=5.0)


def events_of(response: httpx.Response) -> Iterator[Event]:
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        yield from decoder.decode(chunk)


def fetch_all(url: str) -> tuple[httpx.Response, list[Event]]:
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", url) as response:
        return response, list(events_of(response))


def example_lines() -> list[str]:
    return EXAMPLE.read_text().splitlines()


# --------------------------------------------------------------------------- the happy path


def test_serves_a_file_as_one_event_per_line(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE), "--json")
    response, events = fetch_all(running.url)
    assert response.status_code == 200
    lines = example_lines()
    assert [e.data for e in events] == lines
    assert [e.id for e in events] == [str(i) for i in range(1, len(lines) + 1)]
    bill = running.bill()
    assert running.proc.returncode == 0
    assert bill["reason"] == "complete"
    assert bill["tokens"] == sum(count_tokens(line) for line in lines)
    assert bill["events"] == len(lines)
    assert bill["clients"][0]["tokens"] == bill["tokens"]
    assert "Traceback" not in running.stderr


def test_response_headers_are_exactly_the_documented_ones(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE))
    response, _ = fetch_all(running.url)
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["connection"] == "keep-alive"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    assert "content-length" not in response.headers


def test_bill_json_has_the_documented_shape(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE), "--json", "--price", "2.5")
    fetch_all(running.url)
    bill = running.bill()
    for key in ("tokens", "events", "bytes", "duration_s", "reason", "tokenizer", "cost"):
        assert key in bill
    assert bill["tokenizer"] == "whitespace"
    assert bill["cost"] == pytest.approx(bill["tokens"] * 2.5 / 1_000_000)
    (client,) = bill["clients"]
    assert set(client) >= {"tokens", "events", "bytes", "reason"}
    assert client["bytes"] == bill["bytes"] > 0


def test_text_bill_is_a_readable_table(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE))
    fetch_all(running.url)
    running.wait()
    text = running.stdout()
    assert text.startswith("sserelay bill: complete")
    assert f"tokens      {sum(count_tokens(x) for x in example_lines())}" in text


def test_events_path_and_healthz(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE))
    assert httpx.get(running.url + "healthz").text == "ok\n"
    assert httpx.post(running.url).status_code == 405
    _, events = fetch_all(running.url + "events")
    assert len(events) == len(example_lines())


def test_curl_n_shows_every_event(relay: Any) -> None:
    curl = require_tool("curl", package="curl")
    running: Relay = relay("serve", str(EXAMPLE))
    out = subprocess.run([curl, "-sN", running.url], capture_output=True, timeout=20, check=True)
    events = SSEDecoder().decode(out.stdout)
    assert [e.data for e in events] == example_lines()
    assert running.wait() == 0


def test_httpx_sse_reads_the_stream(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE))
    with httpx.Client(timeout=READ_TIMEOUT) as client:
        with connect_sse(client, "GET", running.url) as source:
            received = [(sse.id, sse.data) for sse in source.iter_sse()]
    lines = example_lines()
    assert received == [(str(i), line) for i, line in enumerate(lines, 1)]


# --------------------------------------------------------------------------- live flushing


def test_each_line_is_on_the_wire_before_the_next_is_written(relay: Any) -> None:
    """The gate: line N+1 is written only after event N was received; buffering
    anywhere (in sserelay, uvicorn, or the pipe reader) fails on the read deadline."""
    running: Relay = relay("serve", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        for i in range(1, 6):
            running.feed(f"token number {i}\n")
            event = next(events)
            assert (event.id, event.data) == (str(i), f"token number {i}")
        running.stdin.close()
        assert list(events) == []
    bill = running.bill()
    assert (bill["reason"], bill["events"], bill["tokens"]) == ("complete", 5, 15)


def test_a_line_split_across_writes_is_one_event(relay: Any) -> None:
    running: Relay = relay("serve")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        running.feed("hel")
        running.feed("lo\r")
        running.feed("\nworld\n")
        assert [next(events).data, next(events).data] == ["hello", "world"]
        running.stdin.close()


# --------------------------------------------------------------------------- disconnects


def test_client_disconnect_bills_what_it_received_and_stops_reading(relay: Any) -> None:
    running: Relay = relay("serve", "--json")
    received: list[Event] = []
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        for line in ("one two three", "four five"):
            running.feed(line + "\n")
            received.append(next(events))
    # The client has closed; the relay notices while waiting on its stdin.
    assert running.wait() == EXIT_DISCONNECTED
    bill = json.loads(running.stdout())
    assert bill["reason"] == "client_disconnected"
    assert bill["tokens"] == sum(count_tokens(e.data) for e in received) == 5
    assert bill["events"] == 2
    assert bill["clients"][0]["reason"] == "client_disconnected"
    # Nobody reads stdin any more: the producer is told so.
    with pytest.raises(BrokenPipeError):
        for _ in range(100):
            running.feed("more\n" * 10_000)


def test_second_concurrent_client_joins_the_broadcast(relay: Any) -> None:
    """With the hub a second client no longer gets 409: it gets the history, then live events."""
    running: Relay = relay("serve", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        first = events_of(r)
        running.feed("first\n")
        assert next(first).data == "first"
        with client.stream("GET", running.url) as r2:
            second = events_of(r2)
            assert next(second).data == "first"
            running.feed("second\n")
            assert next(first).data == next(second).data == "second"
            running.stdin.close()
            assert list(second) == []
        assert list(first) == []
    bill = running.bill()
    assert bill["reason"] == "complete"
    assert [(c["events"], c["reason"]) for c in bill["clients"]] == [(2, "complete")] * 2


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_ends_the_stream_cleanly_with_a_bill(relay: Any, signum: int, code: int) -> None:
    running: Relay = relay("serve", "--json")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        events = events_of(r)
        running.feed("alpha beta\n")
        assert next(events).data == "alpha beta"
        running.signal(signum)
        assert list(events) == []  # the response ends cleanly (terminating chunk)
    assert running.wait() == code
    bill = json.loads(running.stdout())
    assert (bill["reason"], bill["tokens"], bill["events"]) == ("interrupted", 2, 1)
    assert "Traceback" not in running.stderr


def test_sigint_with_no_client_prints_an_empty_bill(relay: Any) -> None:
    running: Relay = relay("serve", "--json")
    running.signal(signal.SIGINT)
    assert running.wait() == 130
    bill = json.loads(running.stdout())
    assert (bill["reason"], bill["tokens"], bill["clients"]) == ("interrupted", 0, [])
    assert "Traceback" not in running.stderr


# --------------------------------------------------------------------------- bad input


def serve_bytes(relay: Any, tmp_path: Path, data: bytes, *args: str) -> tuple[list[Event], Any]:
    source = tmp_path / "input.txt"
    source.write_bytes(data)
    running: Relay = relay("serve", str(source), "--json", *args)
    _, events = fetch_all(running.url)
    return events, running


def test_invalid_utf8_is_replaced_and_counted(relay: Any, tmp_path: Path) -> None:
    events, running = serve_bytes(relay, tmp_path, b"caf\xe9 ok\n\xff\xfe\nfine\n")
    assert [e.data for e in events] == ["caf\ufffd ok", "\ufffd\ufffd", "fine"]
    bill = running.bill()
    assert bill["invalid_utf8_bytes"] == 3
    assert "3 invalid UTF-8 bytes were replaced with U+FFFD" in running.stderr


@pytest.mark.parametrize(
    "data",
    [b"a b\rc\rd e\r", b"a b\r\nc\r\nd e\r\n", b"a b\nc\r\nd e\r", b"a b\nc\nd e"],
    ids=["CR", "CRLF", "mixed", "no-final-newline"],
)
def test_every_line_end_convention_gives_the_same_events(
    relay: Any, tmp_path: Path, data: bytes
) -> None:
    events, running = serve_bytes(relay, tmp_path, data)
    assert [e.data for e in events] == ["a b", "c", "d e"]
    assert running.bill()["tokens"] == 5


def test_nul_and_empty_lines_pass_through(relay: Any, tmp_path: Path) -> None:
    events, running = serve_bytes(relay, tmp_path, b"a\x00b\n\n\nend\n")
    assert [e.data for e in events] == ["a\x00b", "", "", "end"]
    assert running.bill()["events"] == 4


def test_field_lookalikes_in_the_input_stay_data(relay: Any, tmp_path: Path) -> None:
    events, _ = serve_bytes(relay, tmp_path, b"a\n\ndata: evil\nid: 99\nevent: x\nretry: 1\n")
    assert [e.data for e in events] == ["a", "", "data: evil", "id: 99", "event: x", "retry: 1"]
    assert all(e.event is None for e in events)
    # The only retry is sserelay's own, on the first event (issue 18); "retry: 1" stayed data.
    assert [e.retry for e in events] == [1000, None, None, None, None, None]
    assert [e.id for e in events] == ["1", "2", "3", "4", "5", "6"]


def test_a_50_mb_line_is_relayed_whole(relay: Any, tmp_path: Path) -> None:
    line = b"word " * (10 * 1024 * 1024)  # 50 MiB, 10 Mi tokens
    events, running = serve_bytes(relay, tmp_path, line + b"\nafter\n")
    assert [len(e.data) for e in events] == [len(line), 5]
    bill = running.bill(timeout=60)
    assert bill["tokens"] == 10 * 1024 * 1024 + 1


def test_empty_file_is_an_empty_complete_stream(relay: Any, tmp_path: Path) -> None:
    events, running = serve_bytes(relay, tmp_path, b"")
    assert events == []
    assert running.bill()["reason"] == "complete"
    assert running.proc.returncode == 0


def run_cli(*args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sserelay", *args],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=stdin,
    )


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path / "nope.txt"), "--port", "0")
    assert result.returncode == EXIT_INPUT_ERROR
    assert result.stderr.strip().splitlines() == [
        f"sserelay: error: cannot open {tmp_path / 'nope.txt'}: No such file or directory"
    ]


def test_directory_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path), "--port", "0")
    assert result.returncode == EXIT_INPUT_ERROR
    assert result.stderr.strip() == f"sserelay: error: cannot open {tmp_path}: Is a directory"


def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(EXAMPLE), "--port", str(port))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"sserelay: error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another server is using it; try --port 0)"
    )


def test_unresolvable_host_is_a_one_line_error() -> None:
    result = run_cli("serve", str(EXAMPLE), "--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 1
    assert result.stderr.startswith("sserelay: error: cannot resolve host 'no-such-host.invalid'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli("serve", "--port", "70000").returncode == 2
    assert run_cli("serve", "--tokenizer", "nope").returncode == 2
    assert run_cli("nope").returncode == 2


def test_closed_stdout_is_a_one_line_error(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE))
    assert running.proc.stdout is not None
    running.proc.stdout.close()
    fetch_all(running.url)
    assert running.wait() == 1
    assert "sserelay: error: cannot write the bill to stdout: closed" in running.stderr
    assert "Traceback" not in running.stderr


# --------------------------------------------------------------------------- options


def test_options_come_from_environment_variables(relay: Any) -> None:
    env = {"SSERELAY_JSON": "1", "SSERELAY_TOKENIZER": "chars", "SSERELAY_PRICE": "1000000"}
    running: Relay = relay("serve", str(EXAMPLE), env=env)
    fetch_all(running.url)
    bill = running.bill()
    chars = sum(len(line) for line in example_lines())
    assert (bill["tokenizer"], bill["tokens"], bill["cost"]) == ("chars", chars, chars)


def test_no_ids(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE), "--no-ids")
    _, events = fetch_all(running.url)
    assert events and all(e.id is None for e in events)


def test_idle_stream_gets_heartbeat_comments(relay: Any) -> None:
    running: Relay = relay("serve", "--heartbeat", "0.2")
    with httpx.Client(timeout=READ_TIMEOUT) as client, client.stream("GET", running.url) as r:
        raw = r.iter_raw()
        running.feed("hello\n")
        seen = b""
        while b": ping\n\n" not in seen:
            seen += next(raw)
        assert seen.index(b"data: hello") < seen.index(b": ping")
        running.stdin.close()


def test_version_and_help_document_exit_codes() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("sserelay, version ")
    for args in (["--help"], ["serve", "--help"]):
        text = run_cli(*args).stdout
        assert "Exit codes" in text and "130" in text and "client_disconnected" in text


def test_quiet_means_no_progress_lines(relay: Any) -> None:
    running: Relay = relay("serve", str(EXAMPLE), "--quiet")
    fetch_all(running.url)
    running.wait()
    assert running.stderr.strip().splitlines() == [f"sserelay: serving on {running.url}"]


def test_live_counter_runs_on_a_terminal(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal gets the rich live counter; stdout keeps only the bill."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sserelay", "serve", "--port", "0", "--json"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"},
    )
    os.close(follower)
    screen = b""

    def read_screen() -> bool:
        nonlocal screen
        screen += os.read(leader, 65536)
        return b"tokens" in screen and b"serving on" in screen

    try:
        wait_until(read_screen, timeout=10)
        url = screen.decode().split("serving on ")[1].split("/")[2]
        assert proc.stdin is not None
        with httpx.Client(timeout=READ_TIMEOUT) as client:
            with client.stream("GET", f"http://{url}/") as r:
                proc.stdin.write(b"one two three\n")
                proc.stdin.close()
                assert [e.data for e in events_of(r)] == ["one two three"]
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert json.loads(proc.stdout.read())["tokens"] == 3
        wait_until(lambda: read_screen() or b"tokens 3" in screen, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        os.close(leader)
