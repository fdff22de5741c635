"""Record and replay end to end: `proxy --record` in front of a paced pytest-httpserver upstream,
then `serve FILE --realtime` (and `serve FILE --as ...`) giving the recorded stream back.
Cassettes of several exchanges, replayed request by request: tests/e2e/test_cassette.py.

Timing tolerance: each replayed gap between events is within ±50 ms of the recorded one (a
noisy 2-core machine; the replays measured here are typically within a few ms).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from sserelay import SSEDecoder, count_tokens
from sserelay.record.format import body_sha256
from tests.conftest import Relay, wait_until

TOLERANCE_S = 0.050
#: The pause before each upstream event: uneven, so a replay that ignored it would show.
PAUSES = [0.12, 0.03, 0.20, 0.05, 0.15, 0.08, 0.25, 0.04]
WORDS = ["Hello", " there", ",", " a", " recorded", " stream", ' "quoted"', "\nend."]


def chat_event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-rec",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-rec",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def anthropic_events(words: list[str]) -> list[bytes]:
    def event(kind: str, **fields: Any) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

    message: dict[str, Any] = {"id": "msg_rec", "type": "message", "role": "assistant"}
    message["content"] = []
    message |= {"model": "claude-rec", "stop_reason": None, "stop_sequence": None}
    message["usage"] = {"input_tokens": 5, "output_tokens": 1}
    block = {"type": "text", "text": ""}
    return [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block=block),
        *(
            event("content_block_delta", index=0, delta={"type": "text_delta", "text": w})
            for w in words
        ),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 9}),
        event("message_stop"),
    ]


class PacedUpstream:
    """Streams `events`, sleeping PAUSES[i] before each; optionally holds before the last
    event until `release` is set (so a test can look at the recording mid-stream)."""

    def __init__(self, events: list[bytes], hold_before_last: bool = False) -> None:
        self.events = events
        self.hold = hold_before_last
        self.release = threading.Event()

    def __call__(self, request: Request) -> Response:
        def body() -> Iterator[bytes]:
            for i, event in enumerate(self.events):
                if self.hold and i == len(self.events) - 1:
                    self.release.wait(10)
                time.sleep(PAUSES[i % len(PAUSES)])
                yield event

        return Response(body(), content_type="text/event-stream")


def timed_events(
    url: str, out: list[tuple[float, bytes]] | None = None, **kwargs: Any
) -> list[tuple[float, bytes]]:
    """Each SSE block of a streamed response with the time it arrived (seconds, monotonic),
    appended to `out` as it arrives."""
    out = [] if out is None else out
    pending = b""
    with httpx.stream(timeout=10, url=url, **kwargs) as response:
        assert response.status_code == 200
        for data in response.iter_raw():
            now = time.monotonic()
            pending += data
            *blocks, pending = pending.split(b"\n\n")
            out += [(now, block + b"\n\n") for block in blocks if not block.startswith(b":")]
    return out


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_recording_replays_byte_identical_events_with_their_timing(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    events = [chat_event(w) for w in WORDS] + [b"data: [DONE]\n\n"]
    feed = PacedUpstream(events, hold_before_last=True)
    upstream.expect_request("/v1/chat/completions", method="POST").respond_with_handler(feed)
    path = tmp_path / "chat.jsonl"
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/v1"), "--record", str(path), "--once", "--json"
    )
    got: list[tuple[float, bytes]] = []
    client = threading.Thread(
        target=timed_events,
        args=(proxy.url + "chat/completions", got),
        kwargs={"method": "POST", "json": {"model": "m"}},
    )
    client.start()
    # Flushed line by line: while the proxy still streams, the file already holds every
    # event relayed so far (its first line, the exchange's, and all but the held last one).
    wait_until(lambda: len(path.read_text().splitlines()) == len(events) + 1, timeout=10)
    try:
        assert proxy.proc.poll() is None
        wait_until(lambda: len(got) == len(events) - 1)
    finally:
        feed.release.set()
    client.join(10)
    assert proxy.bill()["reason"] == "complete"

    header, opening, *lines, end = recorded(path)
    assert header == {"sserelay_recording": 2}
    headers = dict(opening.pop("headers"))
    assert opening == {
        "exchange": 1,
        "t": opening["t"],
        "method": "POST",
        "path": "/chat/completions",
        "body_sha256": body_sha256(b'{"model":"m"}'),
        "status": 200,
    }
    assert headers["content-type"].startswith("text/event-stream")
    assert "date" not in headers and "server" not in headers  # the replaying server's own
    assert [line["data"].encode() for line in lines] == [e[6:-2] for e in events]
    assert {line["exchange"] for line in lines} == {1}
    assert end == {"exchange": 1, "t": end["t"], "end": "complete"}
    relayed = [block for _, block in got]
    assert relayed == events  # the proxy relays these events unchanged

    replay: Relay = relay("serve", str(path), "--realtime", "--no-ids", "--json")
    start = time.monotonic()
    replayed = timed_events(replay.url, method="GET")
    assert [block for _, block in replayed] == relayed  # byte-identical
    bill = replay.bill()
    assert bill["reason"] == "complete"
    assert bill["tokens"] == count_tokens("".join(WORDS))  # the text inside the payloads

    recorded_t = [line["t"] for line in lines]
    replay_t = [t - start for t, _ in replayed]
    errors = [abs(a - b) for a, b in zip(gaps(replay_t), gaps(recorded_t), strict=True)]
    # the last gap holds the time the test kept the upstream waiting: replayed like the rest
    assert max(errors) <= TOLERANCE_S, (errors, gaps(recorded_t))
    print(f"replay gap error: max {max(errors) * 1000:.1f} ms over {len(errors)} gaps")


def test_a_recording_replays_through_the_mock_in_another_format(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    upstream.expect_request("/v1/messages", method="POST").respond_with_handler(
        PacedUpstream(anthropic_events(WORDS))
    )
    path = tmp_path / "messages.jsonl"
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/"), "--record", str(path), "--once", "--json"
    )
    claude = anthropic.Anthropic(base_url=proxy.url.rstrip("/"), api_key="k", max_retries=0)
    message = claude.messages.create(
        model="claude-rec", max_tokens=50, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(
        e.delta.text
        for e in message
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "".join(WORDS)
    assert proxy.bill()["reason"] == "complete"
    assert [line.get("event") for line in recorded(path)[2:4]] == [
        "message_start",
        "content_block_start",
    ]

    # The recorded Anthropic stream, served to the OpenAI SDK with its recorded timing.
    mock: Relay = relay("serve", str(path), "--as", "openai", "--realtime", "--once", "--json")
    client = openai.OpenAI(base_url=mock.url + "v1", api_key="k", max_retries=0)
    start = time.monotonic()
    arrivals: list[float] = []
    deltas: list[str] = []
    for chunk in client.chat.completions.create(
        model="gpt-replay", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
            deltas.append(chunk.choices[0].delta.content)
    client.close()
    assert deltas == WORDS
    delta_t = [
        line["t"] for line in recorded(path)[1:] if line.get("event") == "content_block_delta"
    ]
    errors = [abs(a - b) for a, b in zip(gaps(arrivals), gaps(delta_t), strict=True)]
    assert max(errors) <= TOLERANCE_S, errors
    bill = mock.bill()
    assert bill["reason"] == "complete" and bill["tokens"] == count_tokens("".join(WORDS))


def through_the_mock(relay: Any, path: Path) -> tuple[str, int]:
    """A recording's text as the OpenAI SDK streams it from `serve --as openai --once`,
    and the tokens that run billed."""
    mock: Relay = relay("serve", str(path), "--as", "openai", "--once", "--json", "--quiet")
    client = openai.OpenAI(base_url=mock.url + "v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    deltas = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    client.close()
    return "".join(deltas), mock.bill()["tokens"]


def ollama_lines(words: list[str]) -> list[bytes]:
    """Ollama /api/chat lines, one per word; the last (done) has no line end."""
    message = {"model": "llama-rec", "message": {"role": "assistant", "content": ""}}
    lines = [
        json.dumps(message | {"message": {"role": "assistant", "content": w}, "done": last})
        for last, w in zip([False] * (len(words) - 1) + [True], words, strict=True)
    ]
    return [line.encode() + b"\n" for line in lines[:-1]] + [lines[-1].encode()]


def test_a_last_ndjson_line_with_no_line_end_is_billed_by_proxy_serve_and_the_mock(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    words = ["Hello", " there", " last words"]  # the last line carries two tokens
    text = "".join(words)

    def answer(request: Request) -> Response:
        return Response(iter(ollama_lines(words)), content_type="application/x-ndjson")

    upstream.expect_request("/api/chat", method="POST").respond_with_handler(answer)
    path = tmp_path / "ollama.jsonl"
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/"), "--record", str(path), "--once", "--json"
    )
    body = httpx.post(proxy.url + "api/chat", json={"model": "llama-rec"}, timeout=10).content
    assert body == b"".join(ollama_lines(words))
    bill = proxy.bill()
    assert (bill["reason"], bill["tokens"], bill["events"]) == ("complete", 4, 3)

    replay: Relay = relay("serve", str(path), "--no-ids", "--json", "--quiet")
    events = [block for _, block in timed_events(replay.url, method="GET")]
    assert "".join(e.data for e in SSEDecoder().decode(b"".join(events))).encode() == body
    bill = replay.bill()
    assert (bill["reason"], bill["tokens"]) == ("complete", count_tokens(text))
    assert [c["tokens"] for c in bill["clients"]] == [count_tokens(text)]

    assert through_the_mock(relay, path) == (text, count_tokens(text))


def test_a_recorded_plain_text_body_replays_through_the_mock_with_its_line_ends(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    writes = ["Hello,", " world.\n", "Second line\r\n\n", "naïve end"]
    text = "".join(writes)
    upstream.expect_request("/story").respond_with_handler(
        lambda request: Response(iter([w.encode() for w in writes]), content_type="text/plain")
    )
    path = tmp_path / "text.jsonl"
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/"), "--record", str(path), "--once", "--json"
    )
    assert httpx.get(proxy.url + "story", timeout=10).text == text
    assert proxy.bill()["tokens"] == count_tokens(text)

    assert through_the_mock(relay, path) == (text, count_tokens(text))


def test_a_file_that_is_not_a_valid_recording_is_one_error_line(relay: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sserelay_recording": 1}\n{"t": "soon", "data": "x"}\n')
    running: Relay = relay("serve", str(path), wait_ready=False)
    assert running.wait() == 5
    lines = [line for line in running.stderr.splitlines() if line.strip()]
    assert lines == [
        f"sserelay: error: cannot replay {path}: line 2: 't' must be a number of seconds"
    ]
    assert re.search("Traceback", running.stderr) is None
