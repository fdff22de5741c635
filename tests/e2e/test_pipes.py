"""SOURCE as a pipe or a FIFO (issue 10, item 7): nothing is lost, start-up does not wait
for a writer, and Ctrl-C and SIGTERM take the normal interrupted path.

`sserelay serve <(producer)` is `serve /dev/fd/N` with N a pipe: here an os.pipe() passed
to the real CLI with pass_fds, its producer writing from the moment the relay starts.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sserelay import SSEDecoder
from tests.conftest import Relay

#: Far more than one read, one pipe buffer, or the sniffer's 4 KiB.
LINES = [f"line {i} of the producer" for i in range(20_000)]
TEXT = "".join(line + "\n" for line in LINES).encode()
TIMEOUT = httpx.Timeout(10.0)


def stream_data(url: str) -> list[str]:
    """Every event's data of the stream at `url`, to its end."""
    decoder = SSEDecoder()
    data: list[str] = []
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            data += [event.data for event in decoder.decode(chunk)]
    return data


def produce(path: str) -> threading.Thread:
    """A producer writing TEXT to `path` (opened for writing now, in a thread), then closing."""

    def write() -> None:
        with open(path, "wb") as fifo:
            fifo.write(TEXT)

    producer = threading.Thread(target=write, daemon=True)
    producer.start()
    return producer


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def test_a_fifo_serves_at_once_and_a_late_producer_loses_nothing(relay: Any, fifo: str) -> None:
    # relay() waits for `serving on`: before any writer has opened the FIFO.
    running: Relay = relay("serve", fifo, "--json", "--quiet")
    received: list[str] = []
    client = threading.Thread(target=lambda: received.extend(stream_data(running.url)))
    client.start()
    produce(fifo).join(timeout=10)
    client.join(timeout=10)
    assert received == LINES
    bill = running.bill()
    assert (running.proc.returncode, bill["reason"], bill["events"]) == (0, "complete", len(LINES))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_run_on_a_fifo_with_no_writer(
    relay: Any, fifo: str, signum: int, code: int
) -> None:
    running: Relay = relay("serve", fifo, "--json", "--quiet")
    with httpx.Client(timeout=TIMEOUT) as client, client.stream("GET", running.url) as response:
        assert response.status_code == 200  # waiting on the FIFO
        running.signal(signum)
        assert list(response.iter_raw()) == []
    bill = running.bill()
    assert (running.proc.returncode, bill["reason"]) == (code, "interrupted")
    assert "Aborted" not in running.stderr and "Traceback" not in running.stderr


class DevFdRelay:
    """`sserelay serve /dev/fd/N ARGS`, N the read end of a pipe this test writes."""

    def __init__(self, *args: str) -> None:
        read_end, self.write_end = os.pipe()
        source = f"/dev/fd/{read_end}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sserelay", "serve", source, *args, "--port", "0", "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(read_end,),
        )
        os.close(read_end)
        # The producer writes from the start, as `<(producer)` does.
        self.producer = threading.Thread(target=self._produce, daemon=True)
        self.producer.start()
        self.url = self._serving_url()

    def _produce(self) -> None:
        with open(self.write_end, "wb") as pipe:
            pipe.write(TEXT)

    def _serving_url(self) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        line = b""
        while not line.endswith(b"\n"):
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            assert ready, "sserelay did not start"
            byte = os.read(self.proc.stderr.fileno(), 1)
            assert byte, "sserelay exited"
            line += byte
        return line.decode().split("serving on ")[1].split()[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            assert pipe is not None
            pipe.close()
        self.producer.join(timeout=10)


@pytest.fixture
def dev_fd_relay() -> Iterator[Any]:
    started: list[DevFdRelay] = []

    def start(*args: str) -> DevFdRelay:
        started.append(DevFdRelay(*args))
        return started[-1]

    yield start
    for relay in started:
        relay.close()


def test_a_dev_fd_pipe_is_never_sniffed(dev_fd_relay: Any) -> None:
    running: DevFdRelay = dev_fd_relay()
    assert stream_data(running.url) == LINES
    assert running.proc.wait(timeout=10) == 0


def test_a_dev_fd_pipe_mocked_is_read_once_and_given_whole_to_each_request(
    dev_fd_relay: Any,
) -> None:
    running: DevFdRelay = dev_fd_relay("--as", "openai")
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    url = running.url.rstrip("/") + "/v1/chat/completions"
    for _ in range(2):
        answer = httpx.post(url, json=request, timeout=TIMEOUT).json()
        assert answer["choices"][0]["message"]["content"] == TEXT.decode()
