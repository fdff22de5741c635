"""The `/ui` page in headless Chromium against the real `sserelay serve`.

Chromium (Debian's `chromium`) runs with a fresh profile and background networking off, and is
driven over the DevTools protocol: the test reads the page's DOM while the relay is fed through
its stdin, so it sees the text grow and checks the counters against what was served and billed.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from sserelay import count_tokens
from sserelay.providers.openai_chunks import openai_chunk
from sserelay.providers.payloads import PayloadMeter
from sserelay.record.format import Block, Chunk, Header
from sserelay.wire.sse import Event, SSEDecoder
from tests.conftest import Relay, require_tool, wait_until

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"

#: Bounded waits, generous for a loaded 2-core machine; a passing run takes far less.
START_TIMEOUT = 20.0
PAGE_TIMEOUT = 15.0

#: What the page shows, read in one go: counters, the text, and any element in the text.
STATE = """(() => {
  const shown = (id) => { const e = document.getElementById(id); return e && e.textContent; };
  const text = document.getElementById("text");
  return {
    status: shown("status"), events: shown("events"), tokens: shown("tokens"),
    rate: shown("rate"), lastId: shown("last-id"), title: document.title,
    text: text && text.textContent, elements: text && text.querySelectorAll("*").length,
  };
})()"""

#: Lines that must reach the page as they are: non-ASCII, whitespace that only Python's
#: str.split() and the page's tokenizer agree on, markup, and would-be SSE fields.
TRICKY_LINES = [
    "naïve café — ünïcödé, 日本語のテキスト, emoji 🚀✨, 👩‍👩‍👧 and 𠀋",
    "no\u00a0break\u3000ideographic\u2028line\u2029para\u0085nel\x0bvt\x0cff\x1cfs\u200bzwsp",
    "",
    '<img src=x onerror="document.title=\'pwned\'"> <script>document.title="pwned"</script> &amp;',
    "data: forged",
    "id: 999",
    "event: close",
    "retry: 1",
    ": not a comment",
    " ".join(f"w{i}" for i in range(500)),
]


def chromium() -> str:
    """Chromium's path; without it the test is skipped, except in CI, which must have it."""
    return require_tool("chromium", "chromium-browser", package="chromium")


class DevToolsError(Exception):
    """A DevTools command failed, or the script it evaluated threw."""


class DevTools:
    """A minimal DevTools protocol client on the browser's websocket: one command at a time,
    events kept in `events` as they arrive in between."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + PAGE_TIMEOUT
        while True:
            reply: dict[str, Any] = json.loads(self._ws.recv(timeout=deadline - time.monotonic()))
            if reply.get("id") != command_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise DevToolsError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result


class Page:
    """One tab: navigate, evaluate, and the page's errors seen so far."""

    def __init__(self, devtools: DevTools) -> None:
        self._devtools = devtools
        self._target = devtools.call("Target.createTarget", url="about:blank")["targetId"]
        attached = devtools.call("Target.attachToTarget", targetId=self._target, flatten=True)
        self._session = attached["sessionId"]
        self._call("Runtime.enable")
        self._call("Log.enable")

    def _call(self, method: str, **params: Any) -> dict[str, Any]:
        return self._devtools.call(method, self._session, **params)

    def close(self) -> None:
        self._devtools.call("Target.closeTarget", targetId=self._target)

    def goto(self, url: str) -> None:
        self._call("Page.navigate", url=url)

    def size(self, width: int, height: int) -> None:
        self._call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as it is now, kept at `path` (the path is printed)."""
        data = self._call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")
        return path

    def evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise DevToolsError(json.dumps(result["exceptionDetails"]))
        return result["result"].get("value")

    def state(self) -> dict[str, Any]:
        """What the page shows, or the error while it cannot tell (it is navigating)."""
        try:
            state: dict[str, Any] = self.evaluate(STATE)
        except DevToolsError as exc:
            return {"error": str(exc)}
        return state

    def wait_for(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """The page's state once it shows everything in `wanted`; fails with what it shows."""
        last: dict[str, Any] = {}

        def shows() -> bool:
            nonlocal last
            last = self.state()
            return all(last.get(key) == value for key, value in wanted.items())

        try:
            wait_until(shows, timeout=PAGE_TIMEOUT, interval=0.02)
        except AssertionError:
            raise AssertionError(f"the page never showed {wanted}; it shows {last}") from None
        return last

    def errors(self) -> list[str]:
        """Script errors, and console or policy (CSP) errors that are not network ones: the
        relay ends when the stream does, so the EventSource's reconnects may be refused."""
        self.evaluate("0")  # takes in the events sent so far
        found = []
        for message in self._devtools.events:
            if message.get("sessionId") != self._session:
                continue
            params = message.get("params", {})
            if message.get("method") == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(details.get("exception", {}).get("description") or details["text"])
            elif message.get("method") == "Log.entryAdded":
                entry = params["entry"]
                if entry["level"] == "error" and entry["source"] != "network":
                    found.append(f"{entry['source']}: {entry['text']}")
        return found


@pytest.fixture(scope="module")
def browser() -> Iterator[DevTools]:
    """Chromium with a fresh profile, killed with all its processes and removed afterwards."""
    executable = chromium()
    workdir = Path(tempfile.mkdtemp(prefix="sserelay-chromium-"))
    profile = workdir / "profile"
    log = (workdir / "chromium.log").open("wb")
    argv = [
        executable,
        "--headless=new",
        "--no-sandbox",  # tests may run as root (CI containers)
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--no-default-browser-check",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    # Its own session: renderers and helpers are killed with it as one process group.
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    try:
        port_file = profile / "DevToolsActivePort"

        def listening() -> bool:
            if proc.poll() is not None:
                output = (workdir / "chromium.log").read_text(errors="replace")
                raise AssertionError(f"chromium exited with {proc.returncode}: {output[-2000:]}")
            return port_file.exists() and len(port_file.read_text().splitlines()) == 2

        wait_until(listening, timeout=START_TIMEOUT, interval=0.02)
        port, path = port_file.read_text().splitlines()
        with connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10) as ws:
            try:
                yield DevTools(ws)
            finally:
                # Asked to close, it reaps its own processes; the kill below is for the rest.
                with contextlib.suppress(ConnectionClosed):
                    ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(workdir)


@pytest.fixture
def page(browser: DevTools) -> Iterator[Page]:
    """A new tab, closed after the test."""
    tab = Page(browser)
    yield tab
    tab.close()


def test_the_page_shows_every_event_as_it_arrives_and_the_right_counts(
    relay: Any, page: Page
) -> None:
    running: Relay = relay("serve", "--json", "--quiet")
    page.goto(running.url + "ui")
    # Connected: the headers are in before any event, and the page shows nothing yet.
    page.wait_for({"status": "streaming", "events": "0", "tokens": "0", "text": ""})

    # Live: the first line is on the page while the relay still waits for more.
    running.feed("Hello from sserelay\n")
    page.wait_for({"events": "1", "tokens": "3", "text": "Hello from sserelay\n"})
    assert running.proc.poll() is None

    # The rest in pieces, one cut inside a character, one invalid byte, then the end.
    rest = "\n".join(TRICKY_LINES).encode() + b"\ncaf\xe9 au lait"
    cut = rest.index("🚀".encode()) + 2
    running.feed(rest[:cut])
    running.feed(rest[cut:])
    running.stdin.close()
    lines = ["Hello from sserelay", *TRICKY_LINES, "caf\ufffd au lait"]
    tokens = sum(count_tokens(line) for line in lines)
    shown = page.wait_for({"events": str(len(lines))})

    assert shown["text"] == "".join(line + "\n" for line in lines)
    assert shown["tokens"] == str(tokens)
    assert shown["lastId"] == str(len(lines))  # no forged id
    assert (shown["elements"], shown["title"]) == (0, "sserelay")  # text, never markup
    assert page.errors() == []

    bill = running.bill()
    assert (bill["reason"], bill["events"], bill["tokens"]) == ("complete", len(lines), tokens)
    assert [(c["events"], c["tokens"]) for c in bill["clients"]] == [(len(lines), tokens)]

    # Over: the page says so (no reconnecting), and its rate holds still (it is refreshed every
    # 0.5 s, so two refreshes go by before it is read again).
    ended = page.wait_for({"status": "done"})
    assert float(ended["rate"]) > 0
    held_since = time.monotonic()
    wait_until(lambda: time.monotonic() - held_since > 1.1, timeout=2)
    assert page.state()["rate"] == ended["rate"]


@pytest.mark.parametrize(
    ("chunk", "tokenizer"), [("word", "whitespace"), ("raw", "whitespace"), ("raw", "chars")]
)
def test_the_page_counts_tokens_as_the_server_does_in_every_chunk_mode(
    relay: Any, page: Page, chunk: str, tokenizer: str
) -> None:
    running: Relay = relay("serve", "--chunk", chunk, "--tokenizer", tokenizer, "--json")
    page.goto(running.url + "ui")
    page.wait_for({"status": "streaming"})
    running.feed("Hello wor")
    page.wait_for({"events": "1"})  # a word cut in two across events: still one token
    running.feed("ld,\n  naïve\u3000🚀 again\n")
    running.stdin.close()
    bill = running.bill()
    text = "Hello world,\n  naïve\u3000🚀 again\n"
    assert bill["tokens"] == (len(text) if tokenizer == "chars" else count_tokens(text))
    shown = page.wait_for({"events": str(bill["events"])})
    assert shown["tokens"] == str(bill["tokens"])
    assert shown["text"] == (text if chunk == "raw" else text.rstrip())


def test_the_page_passes_its_token_on_and_shows_a_refusal(
    relay: Any, page: Page, tmp_path: Path
) -> None:
    source = tmp_path / "s.txt"
    source.write_text("one two\nthree\n")
    running: Relay = relay("serve", str(source), "--keep", "--auth-token", "s3cret")
    page.goto(running.url + "ui")
    page.wait_for({"status": "a token is needed", "events": "0", "text": ""})  # 401
    page.goto(running.url + "ui?token=s3cret")
    page.wait_for({"events": "2", "tokens": "3", "lastId": "2", "text": "one two\nthree\n"})


def write_recording(path: Path, name: str) -> str:
    """A recording of the upstream answer tests/payloads/NAME, as `proxy --record` writes it;
    returns the text inside its payloads. NDJSON is recorded in writes of 50 bytes, so a
    write holds several lines and a line ends in a later write. NAME with `-no-end` is
    NDJSON without its done line and whose last line, which has text, has no line end."""
    cut_end = name.endswith("-no-end")
    name = name.removesuffix("-no-end")
    raw = (PAYLOADS / name).read_bytes()
    if cut_end:
        raw = b"".join(raw.splitlines(keepends=True)[:-1]).rstrip(b"\n")
    meter = PayloadMeter()
    if name.endswith(".ndjson"):
        header = Header("POST", "/api/chat", 200, "application/x-ndjson")
        parts: list[Block | Chunk] = [
            Chunk(i / 1000, raw[i : i + 50]) for i in range(0, len(raw), 50)
        ]
        text = "".join(meter.feed(line).text for line in raw.decode().splitlines())
    else:
        events = SSEDecoder().decode(raw)
        if name.startswith("openai"):  # text the tokenizers and the page must read alike
            extra = openai_chunk("c", "m", 1, content="naïve\u3000🚀 café\u00a0au lait ")
            events.insert(1, Event(json.dumps(extra)))
        header = Header("POST", "/v1", 200, "text/event-stream")
        parts = [Block(i / 1000, e.data, e.event, e.id) for i, e in enumerate(events)]
        text = "".join(meter.feed(e.data, e.event).text for e in events)
    path.write_text(header.line() + "".join(part.line() for part in parts))
    return text


@pytest.mark.parametrize(
    ("name", "tokenizer"),
    [
        ("openai_chat_usage.sse", "whitespace"),  # usage-only chunk and [DONE]: no text
        ("openai_chat_usage.sse", "chars"),
        ("anthropic_thinking_tool.sse", "whitespace"),  # thinking and tool input: no text
        ("responses.sse", "whitespace"),  # *.done and response.completed repeat the text
        ("gemini.sse", "chars"),
        ("ollama_chat.ndjson", "whitespace"),
        ("ollama_chat.ndjson-no-end", "chars"),  # its last line is counted at the end
    ],
)
def test_the_page_shows_the_text_of_a_replayed_recording_and_its_bill(
    relay: Any, page: Page, tmp_path: Path, name: str, tokenizer: str
) -> None:
    path = tmp_path / "rec.jsonl"
    text = write_recording(path, name)
    assert text and "{" not in text
    running: Relay = relay("serve", str(path), "--json", "--quiet", "--tokenizer", tokenizer)
    page.goto(running.url + "ui")
    bill = running.bill()
    assert bill["tokens"] == (len(text) if tokenizer == "chars" else count_tokens(text))
    shown = page.wait_for({"events": str(bill["events"]), "status": "done"})  # ended
    assert (shown["text"], shown["tokens"]) == (text, str(bill["tokens"]))
    assert page.errors() == []


# --------------------------------------------------------------------------- the dashboard

#: The dashboard's figures and tables, read in one go.
BOARD = """(() => {
  const shown = (id) => { const e = document.getElementById(id); return e && e.textContent; };
  const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)]
    .map((tr) => [...tr.cells].map((td) => td.textContent));
  return {
    status: shown("status"), message: shown("message"), title: document.title,
    requests: shown("requests"), active: shown("active"), tokens: shown("tokens"),
    clients: shown("clients"), served: shown("served"), ttft: shown("ttft"), cost: shown("cost"),
    ticks: Number(document.body.dataset.ticks || 0),
    byKey: rows("by-key"), byModel: rows("by-model"), recent: rows("recent"),
    markup: document.querySelectorAll("#board img, #board script, #board a").length,
  };
})()"""

#: Pixels of a canvas that a chart coloured (saturated colours: not the grey grid, not text).
PAINTED = """((id) => {
  const canvas = document.getElementById(id);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let painted = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 40 && Math.max(r, g, b) - Math.min(r, g, b) > 60) painted += 1;
  }
  return painted / (canvas.width * canvas.height);
})"""

HOSTILE_MODEL = "<img src=x onerror=\"document.title='pwned'\">"


def board(page: Page) -> dict[str, Any]:
    """The dashboard's state, or the error while it cannot tell (it is navigating)."""
    try:
        state: dict[str, Any] = page.evaluate(BOARD)
    except DevToolsError as exc:
        return {"error": str(exc), "ticks": 0}
    return state


def wait_board(page: Page, check: Any, what: str) -> dict[str, Any]:
    """The dashboard's state once `check(state)` holds; fails with what it shows."""
    last: dict[str, Any] = {}

    def holds() -> bool:
        nonlocal last
        last = board(page)
        return "error" not in last and bool(check(last))

    try:
        wait_until(holds, timeout=PAGE_TIMEOUT, interval=0.05)
    except AssertionError:
        raise AssertionError(f"the dashboard never showed {what}; it shows {last}") from None
    return last


def painted(page: Page, canvas: str) -> float:
    share: float = page.evaluate(f"{PAINTED}({json.dumps(canvas)})")
    return share


def money(cost: float | None) -> str:
    return "-" if cost is None else f"{cost:.6f}".rstrip("0").rstrip(".") or "0"


def table_of(groups: dict[str, Any]) -> list[list[str]]:
    """A /usage per-key or per-model table, as the dashboard shows it."""
    return [
        [name, f"{g['requests']:,}", f"{g['active']:,}", f"{g['tokens']:,}", money(g["cost"])]
        for name, g in groups.items()
    ]


def next_tick(page: Page) -> None:
    """Wait for the dashboard's next tick (a second apart), so the chart gets a new point."""
    ticks = board(page)["ticks"]
    wait_board(page, lambda s: s["ticks"] > ticks, "another tick")


def test_the_serve_dashboard_charts_the_stream_and_shows_what_usage_says(
    relay: Any, page: Page, tmp_path: Path
) -> None:
    running: Relay = relay("serve", "--keep", "--price", "2", "--json", "--quiet")
    page.size(1280, 720)
    page.goto(running.url + "ui")
    page.wait_for({"status": "streaming"})
    for i in range(4):  # a line a tick: the chart gets points with tokens in them
        running.feed(f"line {i} has <b>six</b> words in it\n")
        page.wait_for({"events": str(i + 1)})
        next_tick(page)
    next_tick(page)  # the stream is idle now: every figure is final
    usage = httpx.get(running.url + "usage", timeout=10).json()
    totals = usage["totals"]
    shown = wait_board(
        page,
        lambda s: s["served"] == f"{totals['requests']:,}" and s["cost"] == money(totals["cost"]),
        "the figures of /usage",
    )
    assert (shown["clients"], totals["active"]) == ("1", 1)
    assert shown["tokens"] == str(totals["tokens"]) == "28"
    assert shown["ttft"] != "-" and totals["time_to_first_token_s"] is not None
    assert painted(page, "chart-rate") > 0.01  # the line and its fill drew
    shot = page.screenshot(tmp_path / "serve-dashboard.png")
    assert shot.stat().st_size > 10_000

    running.signal(signal.SIGINT)
    page.wait_for({"status": "done"})
    assert running.bill()["reason"] == "interrupted"
    assert (board(page)["markup"], board(page)["title"]) == (0, "sserelay")
    assert page.errors() == []


def test_the_requests_dashboard_shows_tables_and_charts_equal_to_usage(
    relay: Any, page: Page, tmp_path: Path
) -> None:
    source = tmp_path / "answer.txt"
    source.write_text("Paris is the capital of France.\nIt is on the Seine.\n")
    running: Relay = relay(
        "serve", str(source), "--as", "openai", "--price", "3", "--rate", "400", "--no-ledger"
    )
    page.size(1280, 900)
    page.goto(running.url + "ui")
    page.wait_for({"status": "live"})
    url = running.url + "v1/chat/completions"
    models = ["gpt-4o-mini", "claude-sonnet", HOSTILE_MODEL]
    with httpx.Client(timeout=10) as client:
        for model in models:  # a round a tick: the chart gets points with tokens in them
            for stream in (True, False):
                body: dict[str, Any] = {"model": model, "stream": stream}
                body["messages"] = [{"role": "user", "content": "hi"}]
                answer = client.post(url, json=body)
                assert answer.status_code == 200
            next_tick(page)
        # One client that leaves mid-stream.
        leaving = {"model": "gpt-4o-mini", "messages": [], "stream": True}
        with client.stream("POST", url, json=leaving) as response:
            next(response.iter_lines())
    wait_until(
        lambda: httpx.get(running.url + "usage", timeout=10).json()["totals"]["requests"] == 7
    )
    next_tick(page)
    usage = httpx.get(running.url + "usage", timeout=10).json()
    totals = usage["totals"]
    shown = wait_board(
        page, lambda s: s["requests"] == "7" and s["active"] == "0", "the seven requests"
    )
    assert shown["tokens"] == f"{totals['tokens']:,}" and shown["cost"] == money(totals["cost"])
    assert shown["byModel"] == table_of(usage["by_model"])
    assert shown["byKey"] == [["none yet"]]
    assert len(shown["recent"]) == 7
    assert [row[-1] for row in shown["recent"]].count("client_disconnected") == 1
    assert HOSTILE_MODEL in [row[2] for row in shown["recent"]]  # as text
    assert (shown["markup"], shown["title"]) == (0, "sserelay")  # never as markup
    assert painted(page, "chart-rate") > 0.01
    assert painted(page, "chart-reasons") > 0.01
    page.screenshot(tmp_path / "requests-dashboard.png")
    assert page.errors() == []

    running.signal(signal.SIGINT)
    page.wait_for({"status": "done"})
    assert running.wait() == 130


def test_the_dashboard_of_a_protected_relay_asks_for_its_token(
    relay: Any, page: Page, tmp_path: Path
) -> None:
    source = tmp_path / "answer.txt"
    source.write_text("one two\n")
    running: Relay = relay(
        "serve", str(source), "--as", "openai", "--admin-token", "adm1n", "--no-ledger"
    )
    page.goto(running.url + "ui")
    shown = wait_board(page, lambda s: s["status"] == "a token is needed", "a token is needed")
    assert "/ui?token=" in shown["message"]
    page.goto(running.url + "ui?token=wrong")
    shown = wait_board(page, lambda s: s["status"] == "a token is needed", "a refusal")
    assert "refused" in shown["message"]
    page.goto(running.url + "ui?token=adm1n")
    wait_board(page, lambda s: s["status"] == "live" and s["ticks"] > 0, "live figures")
    assert page.errors() == []
