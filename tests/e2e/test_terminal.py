"""The live view on a real terminal: tmux runs sserelay in a pane of a given width, and the
test reads the screen as a person would see it (`capture-pane`).

A line the terminal had to wrap is a line cut mid-field: `capture-pane -J` joins wrapped rows,
so every joined line must fit the pane's width.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EXAMPLE, require_tool, wait_until

SCREEN_TIMEOUT = 15.0
_URL = re.compile(r"serving on (http://127\.0\.0\.1:\d+/)")


@dataclass
class Pane:
    """One tmux pane running a command, on a private tmux server."""

    tmux: str
    socket: Path
    width: int
    readers: list[threading.Thread] = field(default_factory=list)

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            [self.tmux, "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout

    def screen(self) -> list[str]:
        """The pane's rows, wrapped rows joined into the line they were written as."""
        return self._run("capture-pane", "-p", "-J", "-t", "relay").rstrip("\n").split("\n")

    def wait_for(self, predicate: Any, what: str) -> list[str]:
        rows: list[str] = []

        def shows() -> bool:
            nonlocal rows
            rows = self.screen()
            return bool(predicate(rows))

        try:
            wait_until(shows, timeout=SCREEN_TIMEOUT, interval=0.05)
        except AssertionError:
            shown = "\n".join(rows)
            raise AssertionError(f"the pane never showed {what}; it shows:\n{shown}") from None
        return rows

    def url(self) -> str:
        rows = self.wait_for(lambda rows: _URL.search("\n".join(rows)), "serving on URL")
        match = _URL.search("\n".join(rows))
        assert match is not None
        return match.group(1)

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "relay", *keys)

    def read_stream(self, method: str, url: str, **kwargs: Any) -> None:
        """A client that reads a streaming answer to its end, in a thread of its own."""

        def read() -> None:
            with contextlib.suppress(httpx.HTTPError):
                with httpx.stream(method, url, timeout=30, **kwargs) as response:
                    for _ in response.iter_bytes():
                        pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.readers.append(reader)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Any]:
    """`pane(width, *args)` runs `sserelay ARGS` in a tmux pane `width` columns wide."""
    tmux = require_tool("tmux", package="tmux")
    started: list[Pane] = []

    def start(width: int, *args: str) -> Pane:
        socket = tmp_path / f"tmux-{len(started)}"
        command = shlex.join([sys.executable, "-m", "sserelay", *args, "--port", "0"])
        subprocess.run(
            [tmux, "-S", str(socket), "-f", "/dev/null", "new-session", "-d", "-s", "relay",
             "-x", str(width), "-y", "30", "env", "TERM=xterm-256color", "COLUMNS=",
             "sh", "-c", command, ";", "set-option", "-t", "relay", "remain-on-exit", "on"],
            check=True,
            timeout=10,
        )  # fmt: skip
        started.append(Pane(tmux, socket, width))
        return started[-1]

    yield start
    for running in started:
        # Its own server only: the pane's processes get SIGHUP and end.
        subprocess.run(
            [tmux, "-S", str(running.socket), "kill-server"], capture_output=True, timeout=10
        )
        for reader in running.readers:
            reader.join(timeout=10)


def live_line(rows: list[str]) -> str:
    """The totals line: the last one that shows tokens."""
    found = [row for row in rows if row.startswith(("tokens ", "sserelay: tokens "))]
    return found[-1] if found else ""


@pytest.mark.parametrize("width", [60, 120])
def test_the_live_line_keeps_clients_and_cost_and_never_wraps(pane: Any, width: int) -> None:
    running: Pane = pane(width, "serve", str(EXAMPLE), "--keep", "--rate", "20", "--price", "1")
    url = running.url()
    for _ in range(2):
        running.read_stream("GET", url)
    rows = running.wait_for(
        lambda rows: "clients 2 connected / 2 served" in live_line(rows), "two clients"
    )
    line = live_line(rows)
    assert "cost " in line
    assert all(len(row) <= width for row in rows), rows
    if width == 120:
        assert line.startswith("sserelay: tokens ") and " tok/s · " in line and "events " in line
    else:
        assert line.startswith("tokens ") and "events" not in line


@pytest.mark.parametrize("width", [60, 120])
def test_a_proxy_shows_its_requests_in_flight_above_the_totals(
    pane: Any, relay: Any, width: int
) -> None:
    upstream = relay("serve", str(EXAMPLE), "--as", "openai", "--rate", "20", "--no-ledger")
    running: Pane = pane(width, "proxy", "--upstream", upstream.url + "v1", "--no-ledger")
    url = running.url() + "chat/completions"
    for model in ("gpt-4o-mini", "claude-sonnet-4-5"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        running.read_stream("POST", url, json=body)
    rows = running.wait_for(
        lambda rows: "clients 2 connected / 2 served" in live_line(rows), "two requests"
    )
    table = rows[rows.index(next(r for r in rows if "model" in r and "tokens" in r)) :]
    assert any("gpt-4o-mini" in row for row in table)
    assert any("claude-sonnet-4-5" in row for row in table)
    assert all(len(row) <= width for row in rows), rows
    assert table[-1] == live_line(rows)  # the totals under the table


def test_typed_lines_stay_whole_and_the_counter_follows_them(pane: Any) -> None:
    running: Pane = pane(80, "serve", "--json")
    url = running.url()
    running.wait_for(
        lambda rows: any("type lines, Ctrl-D to end" in row for row in rows), "how to end"
    )
    running.read_stream("GET", url)
    # Nothing is printed until a line is typed: the relay's own /usage says the client is in.
    wait_until(lambda: httpx.get(url + "usage", timeout=5).json()["totals"]["active"] == 1)
    running.keys("hello there, relay", "Enter")
    rows = running.wait_for(lambda rows: "tokens 3 " in "\n".join(rows), "the counter")
    typed = rows.index("hello there, relay")  # the line as typed, untouched
    assert live_line(rows[typed + 1 : typed + 2]).startswith(("tokens 3 ", "sserelay: tokens 3 "))
    running.keys("second line", "Enter")
    rows = running.wait_for(lambda rows: "tokens 5 " in "\n".join(rows), "the second line")
    assert "second line" in rows and "hello there, relay" in rows
    running.keys("C-d")
    rows = running.wait_for(lambda rows: '"tokens": 5' in "\n".join(rows), "the bill")
