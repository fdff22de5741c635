"""`sserelay serve -- CMD ARGS...` end to end (issue 18, "A command as the source"): the real
CLI runs a real producer under a pty and serves it to real HTTP clients.

The producers are Python run with PYTHONUNBUFFERED removed from their environment (this
environment may set it), so they buffer as they would by default: by block on a pipe, by
line on a terminal. None of them flushes.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sserelay import SSEDecoder
from tests.conftest import Relay, wait_until

TIMEOUT = httpx.Timeout(10.0)

GATED = """\
import os, sys, time
print("first line")  # not flushed: only a line-buffered stdout sends it now
deadline = time.monotonic() + 10
while not os.path.exists(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit("the gate was never opened")
    time.sleep(0.005)
print("second line")
"""

FAST = """\
import sys
for i in range(int(sys.argv[1])):
    print(f"line {i}")
"""

FAILING = """\
import sys
print("partial answer")
print("more of it")
sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: the model went away\\n")
sys.exit(3)
"""

#: Starts a grandchild in its process group, says both pids, and runs until stopped.
FAMILY = """\
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(os.getpid(), child.pid)
time.sleep(60)
"""

ONCE = """\
import sys
with open(sys.argv[1], "a") as runs:
    runs.write("ran\\n")
print("Hello from")
print("a command.")
"""


def producer(tmp_path: Path, code: str, *args: str) -> list[str]:
    """The argv after `--` that runs `code` as a default-buffered Python program."""
    script = tmp_path / "producer.py"
    script.write_text(code)
    return ["env", "-u", "PYTHONUNBUFFERED", sys.executable, str(script), *args]


def events(url: str) -> Generator[str, None, None]:
    """Each event's data of the stream at `url`, as it arrives, to the stream's end."""
    decoder = SSEDecoder()
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            for event in decoder.decode(chunk):
                yield event.data


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (an orphan init has not reaped yet has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_line_reaches_the_client_before_the_producer_writes_the_next(
    relay: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    running: Relay = relay(
        "serve", "--json", "--quiet", "--", *producer(tmp_path, GATED, str(gate))
    )
    received = events(running.url)
    # On a pipe, "first line" would sit in the producer's buffer until it exits, which it
    # does only after the gate opens: this would fail on the deadline, not hang.
    assert next(received) == "first line"
    gate.touch()
    assert list(received) == ["second line"]
    bill = running.bill()
    assert (running.proc.returncode, bill["reason"], bill["events"]) == (0, "complete", 2)


def test_a_fast_producer_and_a_slow_reader_lose_nothing(relay: Any, tmp_path: Path) -> None:
    lines = 200_000
    running: Relay = relay(
        "serve", "--json", "--quiet", "--", *producer(tmp_path, FAST, str(lines))
    )
    received = []
    for data in events(running.url):
        received.append(data)
        if len(received) % 50_000 == 1:
            # Read nothing for a while: the relay stops reading the pty, the producer
            # blocks in its write, and the pty holds the rest, as a pipe would.
            time.sleep(0.2)
    assert received == [f"line {i}" for i in range(lines)]
    bill = running.bill(timeout=30)
    assert (running.proc.returncode, bill["reason"], bill["events"]) == (0, "complete", lines)


def test_a_failing_command_is_an_input_error_with_its_status(relay: Any, tmp_path: Path) -> None:
    argv = producer(tmp_path, FAILING)
    running: Relay = relay("serve", "--json", "--quiet", "--", *argv)
    assert list(events(running.url)) == ["partial answer", "more of it"]
    bill = running.bill()
    assert (running.proc.returncode, bill["reason"], bill["events"]) == (5, "input_error", 2)
    wait_until(lambda: "error:" in running.stderr)  # read by a thread: it may lag the exit
    errors = [line for line in running.stderr.splitlines() if "error" in line]
    assert errors == [
        f"sserelay: error: {' '.join(argv)} exited with status 3: RuntimeError: the model went away"
    ]


@pytest.mark.parametrize(
    ("ending", "code"),
    [("SIGINT", 130), ("SIGTERM", 143), ("the client leaves", 3)],
)
def test_the_end_of_the_run_stops_the_command_and_its_children(
    relay: Any, tmp_path: Path, ending: str, code: int
) -> None:
    running: Relay = relay("serve", "--json", "--quiet", "--", *producer(tmp_path, FAMILY))
    received = events(running.url)
    child, grandchild = map(int, next(received).split())
    assert not gone(child) and not gone(grandchild)
    if ending == "the client leaves":
        received.close()
    else:
        running.signal(getattr(signal, ending))
    assert running.wait() == code
    wait_until(lambda: gone(child) and gone(grandchild))
    assert "Traceback" not in running.stderr
    received.close()


def test_a_command_that_cannot_run_is_one_line_and_exit_5_before_listening(relay: Any) -> None:
    running: Relay = relay("serve", "--", "sserelay-no-such-command", "--flag", wait_ready=False)
    assert running.wait() == 5
    wait_until(lambda: "error" in running.stderr)  # read by a thread: it may lag the exit
    assert running.stderr == (
        "sserelay: error: cannot run sserelay-no-such-command: No such file or directory\n"
    )


def test_a_source_and_a_command_together_are_a_usage_error(relay: Any, tmp_path: Path) -> None:
    running: Relay = relay("serve", str(tmp_path), "--", "echo", "hi", wait_ready=False)
    assert running.wait() == 2
    wait_until(lambda: "SOURCE and -- CMD are two sources" in running.stderr)


def test_the_mock_runs_the_command_once_and_answers_every_request_with_it(
    relay: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    argv = producer(tmp_path, ONCE, str(runs))
    running: Relay = relay("serve", "--as", "openai", "--json", "--", *argv)
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    deltas = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert "".join(d or "" for d in deltas) == "Hello from\na command.\n"
    whole = client.chat.completions.create(model="m", messages=[])
    assert whole.choices[0].message.content == "Hello from\na command.\n"
    client.close()
    running.signal(signal.SIGINT)
    bill = running.bill()
    assert running.proc.returncode == 130
    assert [row["reason"] for row in bill["clients"]] == ["complete", "complete"]
    assert runs.read_text() == "ran\n"
