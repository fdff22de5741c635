"""`sserelay proxy` end to end: the real CLI in front of real upstreams, driven by real clients.

Upstreams are pytest-httpserver (threaded, streaming handlers that replay the provider payloads
in tests/payloads/ with a pause between events) and, where a test needs to control the socket
itself (a body that dies, an upstream that stalls, timing its close), a small raw-socket server.
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from sserelay import SSEDecoder, count_tokens
from sserelay.metering.usage import Usage
from sserelay.providers.payloads import PayloadMeter
from tests.conftest import Relay, require_tool, wait_until

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
SECRET = "sk-upstream-SECRET-7d1f0c2a9b"
EXIT_DISCONNECTED = 3
EXIT_UPSTREAM_ERROR = 4
TIMEOUT = httpx.Timeout(10.0)


# --------------------------------------------------------------------------- upstreams


def events_in(raw: bytes) -> list[bytes]:
    """The wire blocks of an SSE body, each with its blank line (LF, CRLF or CR ends)."""
    return re.findall(rb".*?(?:\r\n\r\n|\n\n|\r\r)", raw, re.S)


def replay(name: str, pause: float = 0.002) -> Callable[[Request], Response]:
    """A handler that streams tests/payloads/NAME: one SSE event (or NDJSON line) per write."""
    raw = (PAYLOADS / name).read_bytes()
    if name.endswith(".ndjson"):
        parts, content_type = raw.splitlines(keepends=True), "application/x-ndjson"
    else:
        parts, content_type = events_in(raw), "text/event-stream"

    def handler(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            for part in parts:
                yield part
                time.sleep(pause)

        return Response(body(), content_type=content_type)

    return handler


def expected(name: str) -> tuple[str, Usage | None, str | None]:
    """Text, usage and model of a payload file, read with the formats layer alone."""
    raw = (PAYLOADS / name).read_bytes()
    meter = PayloadMeter()
    if name.endswith(".ndjson"):
        texts = [meter.feed(line).text for line in raw.decode().splitlines()]
    else:
        texts = [meter.feed(e.data, e.event).text for e in SSEDecoder().decode(raw)]
    return "".join(texts), meter.usage, meter.model


class RawUpstream:
    """One connection at a time on a raw socket: read the request, send `head` and each of
    `chunks` (HTTP/1.1 chunked), then `then`: "hold" (wait for the peer to close), "die"
    (close without the last chunk), "end", or "stream" (a one-word event every 5 ms until the
    peer closes). Records when the proxy closes the socket."""

    def __init__(self, chunks: list[bytes], then: str = "hold", answer: bool = True) -> None:
        self.chunks = chunks
        self.then = then
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.closed_at: float | None = None
        self.closed = threading.Event()
        self.sent = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                self._exchange(conn)
            except OSError:
                pass
            finally:
                if self.closed_at is None:
                    self.closed_at = time.monotonic()
                self.closed.set()

    def _exchange(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            data = conn.recv(65536)
            if not data:
                return
            request += data
        head, _, body = request.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        while length and len(body) < int(length.group(1)):
            body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        if self.answer:
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for chunk in self.chunks:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.sent.set()
        if self.then == "die":
            return
        if self.then == "end":
            conn.sendall(b"0\r\n\r\n")
        if self.then == "stream":
            n = 0
            while not select.select([conn], [], [], 0.005)[0]:
                event = chat_event(f" w{n}")
                conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                n += 1
        # Wait for the proxy to close its side: recv() returns b"" (FIN) or raises (RST).
        while conn.recv(65536):
            pass
        self.closed_at = time.monotonic()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(chunks: list[bytes], then: str = "hold", answer: bool = True) -> RawUpstream:
        server = RawUpstream(chunks, then, answer)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def chat_event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def proxy(relay: Any, url: str, *args: str) -> Relay:
    running: Relay = relay("proxy", "--upstream", url, "--json", *args)
    return running


def no_traceback(running: Relay) -> None:
    assert "Traceback" not in running.stderr, running.stderr


def error_lines(running: Relay) -> list[str]:
    return [line for line in running.stderr.splitlines() if line.startswith("sserelay: error:")]


# --------------------------------------------------------------------------- real clients


def test_openai_sdk_streams_a_chat_completion_through_the_proxy(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/chat/completions", method="POST").respond_with_handler(
        replay("openai_chat.sse")
    )
    running = proxy(
        relay,
        upstream.url_for("/v1"),
        "--once",
        "--upstream-header",
        f"Authorization: Bearer {SECRET}",
    )
    client = openai.OpenAI(base_url=running.url, api_key="client-key", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say something about streams."}],
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    client.close()
    want, _, model = expected("openai_chat.sse")
    assert text == want
    bill = running.bill()
    assert running.proc.returncode == 0
    assert bill["reason"] == "complete"
    assert bill["tokens"] == count_tokens(want)
    row = bill["clients"][0]
    assert (row["method"], row["path"], row["upstream_status"]) == (
        "POST",
        "/chat/completions",
        200,
    )
    assert (row["model"], row["partial"], row["upstream_usage"]) == (model, False, None)
    assert "upstream_usage" not in bill  # reported nothing: absent, not zeros
    # the upstream saw the configured key, never the client's
    (request, _), *_ = upstream.log
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert json.loads(request.get_data())["model"] == "gpt-4o-mini"
    assert SECRET not in running.stderr and SECRET not in json.dumps(bill)
    no_traceback(running)


@pytest.mark.parametrize(
    "name", ["anthropic.sse", "responses.sse", "gemini.sse", "openai_chat_usage.sse"]
)
def test_httpx_sse_gets_every_event_faithfully_and_the_bill_has_upstream_usage(
    relay: Any, upstream: HTTPServer, name: str
) -> None:
    upstream.expect_request("/v1/stream").respond_with_handler(replay(name))
    running = proxy(relay, upstream.url_for("/v1"), "--once")
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        connect_sse(client, "POST", running.url + "stream", json={"stream": True}) as source,
    ):
        assert source.response.headers["content-type"].startswith("text/event-stream")
        got = [(e.event, e.data, e.id) for e in source.iter_sse()]
    sent = SSEDecoder().decode((PAYLOADS / name).read_bytes())
    assert got == [(e.event or "message", e.data, e.id or "") for e in sent]
    text, usage, model = expected(name)
    bill = running.bill()
    assert bill["reason"] == "complete"
    assert bill["tokens"] == count_tokens(text)
    assert bill["events"] == len(sent)
    assert usage is not None
    assert bill["upstream_usage"] == usage.to_dict()
    assert bill["clients"][0]["upstream_usage"] == usage.to_dict()
    assert bill["clients"][0]["model"] == model
    no_traceback(running)


def test_anthropic_output_usage_is_the_last_report_and_a_missing_total_stays_null(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/messages").respond_with_handler(replay("anthropic.sse"))
    running = proxy(relay, upstream.url_for("/v1"), "--once")
    httpx.post(running.url + "messages", json={"stream": True}, timeout=TIMEOUT)
    usage = running.bill()["upstream_usage"]
    assert usage == {
        "input_tokens": 25,
        "output_tokens": 15,
        "total_tokens": None,
        # issue 12: Anthropic's cache counts are kept (reported as 0 here: 0, not None)
        "cached_tokens": 0,
        "cache_creation_tokens": 0,
    }


def test_curl_n_gets_ndjson_unchanged_metered_line_by_line(
    relay: Any, upstream: HTTPServer
) -> None:
    curl = require_tool("curl", package="curl")
    upstream.expect_request("/api/chat").respond_with_handler(replay("ollama_chat.ndjson"))
    running = proxy(relay, upstream.url_for("/"), "--once")
    out = subprocess.run(
        [curl, "-sN", "-d", '{"model": "llama3.2"}', running.url + "api/chat"],
        capture_output=True,
        timeout=20,
        check=True,
    )
    raw = (PAYLOADS / "ollama_chat.ndjson").read_bytes()
    assert out.stdout == raw
    text, usage, _ = expected("ollama_chat.ndjson")
    bill = running.bill()
    assert bill["reason"] == "complete"
    assert bill["tokens"] == count_tokens(text)
    assert bill["events"] == len(raw.splitlines())
    assert bill["bytes"] == len(raw)
    assert usage is not None
    assert bill["upstream_usage"] == usage.to_dict()


@pytest.mark.parametrize(
    ("content_type", "tokens"), [("application/x-ndjson", 5), ("text/plain", 4)]
)
def test_a_last_line_with_no_line_end_is_metered(
    relay: Any, upstream: HTTPServer, content_type: str, tokens: int
) -> None:
    lines = [b'{"model":"m","message":{"content":"two words"},"done":false}\n']
    lines += [b'{"model":"m","message":{"content":" and three more"},"done":true}']
    if content_type == "text/plain":
        lines = [b"one two\n", b"three four"]
    upstream.expect_request("/api/chat").respond_with_handler(
        lambda request: Response(iter(lines), content_type=content_type)
    )
    running = proxy(relay, upstream.url_for("/"), "--once")
    assert httpx.post(running.url + "api/chat", timeout=TIMEOUT).content == b"".join(lines)
    bill = running.bill()
    assert (bill["reason"], bill["tokens"], bill["bytes"]) == (
        "complete",
        tokens,
        len(b"".join(lines)),
    )


def test_curl_n_sees_each_event_before_the_upstream_sends_the_next(
    relay: Any, upstream: HTTPServer
) -> None:
    curl = require_tool("curl", package="curl")
    received_first = threading.Event()

    def gated(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            yield chat_event("first")
            # The gate: the second event is sent only once curl has printed the first.
            received_first.wait(10)
            yield chat_event(" second")
            yield b"data: [DONE]\n\n"

        return Response(body(), content_type="text/event-stream")

    upstream.expect_request("/v1/chat/completions").respond_with_handler(gated)
    running = proxy(relay, upstream.url_for("/v1"), "--once")
    with subprocess.Popen(
        [curl, "-sN", "-d", "{}", running.url + "chat/completions"], stdout=subprocess.PIPE
    ) as curl_proc:
        assert curl_proc.stdout is not None
        first = curl_proc.stdout.readline()
        assert b'"first"' in first
        received_first.set()
        rest = curl_proc.stdout.read()
    assert b'" second"' in rest and b"[DONE]" in rest
    assert running.bill()["tokens"] == 2


# --------------------------------------------------------------------------- forwarding


def echo(request: Request) -> Response:
    """A JSON answer describing the request the upstream received."""
    return Response(
        json.dumps(
            {
                "path": request.path,
                "query": request.query_string.decode(),
                "method": request.method,
                "body": request.get_data(as_text=True),
                "headers": {k.lower(): v for k, v in request.headers.items()},
            }
        ),
        content_type="application/json",
    )


def test_reverse_proxy_semantics_and_many_requests_until_ctrl_c(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request(re.compile("/base.*")).respond_with_handler(echo)
    running = proxy(
        relay,
        upstream.url_for("/base") + "?key=" + SECRET,
        "--upstream-header",
        "X-Api-Key: " + SECRET,
    )
    with httpx.Client(timeout=TIMEOUT) as client:
        root = client.get(running.url).json()
        deep = client.post(
            running.url + "x/y",
            params={"q": "1"},
            content=b"hello body",
            headers={"X-Custom": "kept", "Keep-Alive": "timeout=5", "Connection": "keep-alive"},
        ).json()
        assert client.get(running.url + "healthz").text == "ok\n"
    assert (root["path"], root["method"]) == ("/base", "GET")
    assert root["query"] == f"key={SECRET}"
    assert (deep["path"], deep["method"], deep["body"]) == ("/base/x/y", "POST", "hello body")
    assert deep["query"] == f"key={SECRET}&q=1"
    assert deep["headers"]["x-custom"] == "kept"
    assert deep["headers"]["x-api-key"] == SECRET
    assert "keep-alive" not in deep["headers"]
    assert deep["headers"]["accept-encoding"] == "identity"
    wait_until(lambda: running.stderr.count(" GET /") + running.stderr.count(" POST /") >= 2)
    running.signal(signal.SIGINT)
    bill = running.bill()
    assert running.proc.returncode == 130
    assert bill["reason"] == "interrupted"
    assert [c["reason"] for c in bill["clients"]] == ["complete", "complete"]
    assert [c["path"] for c in bill["clients"]] == ["/", "/x/y"]
    everything = running.stderr + json.dumps(bill)
    assert SECRET not in everything
    assert "proxying to " + upstream.url_for("/base") in running.stderr
    no_traceback(running)


def test_concurrent_requests_are_proxied_independently_and_sigterm_bills_them(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/chat/completions").respond_with_handler(
        replay("openai_chat.sse", pause=0.02)
    )
    running = proxy(relay, upstream.url_for("/v1"))
    text, _, _ = expected("openai_chat.sse")
    results: list[str] = []

    def one() -> None:
        with (
            httpx.Client(timeout=TIMEOUT) as client,
            connect_sse(client, "POST", running.url + "chat/completions", json={}) as source,
        ):
            meter = PayloadMeter()
            results.append("".join(meter.feed(e.data).text for e in source.iter_sse()))

    threads = [threading.Thread(target=one) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    elapsed = time.monotonic() - started
    assert results == [text] * 4
    # 14 events 20 ms apart: one stream takes ~0.3 s; four in sequence would take 1.1 s or more.
    assert elapsed < 1.0
    wait_until(lambda: running.stderr.count("· complete") == 4)
    running.signal(signal.SIGTERM)
    bill = running.bill()
    assert running.proc.returncode == 143
    assert bill["reason"] == "interrupted"
    assert len(bill["clients"]) == 4
    assert all(c["tokens"] == count_tokens(text) for c in bill["clients"])
    assert bill["tokens"] == 4 * count_tokens(text)


def test_include_usage_asks_the_upstream_and_hides_the_usage_chunk_from_the_client(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/chat/completions").respond_with_handler(
        replay("openai_chat_usage.sse")
    )
    running = proxy(relay, upstream.url_for("/v1"), "--once", "--include-usage")
    request = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user"}]}
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        connect_sse(client, "POST", running.url + "chat/completions", json=request) as source,
    ):
        datas = [e.data for e in source.iter_sse()]
    (sent, _), *_ = upstream.log
    assert json.loads(sent.get_data())["stream_options"] == {"include_usage": True}
    assert all('"choices":[]' not in d for d in datas)
    assert datas[-1] == "[DONE]"
    text, usage, _ = expected("openai_chat_usage.sse")
    bill = running.bill()
    assert usage is not None
    assert bill["upstream_usage"] == usage.to_dict()
    assert bill["tokens"] == count_tokens(text)
    assert bill["events"] == len(datas)


def test_include_usage_keeps_the_chunk_for_a_client_that_asked(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/chat/completions").respond_with_handler(
        replay("openai_chat_usage.sse")
    )
    running = proxy(relay, upstream.url_for("/v1"), "--once", "--include-usage")
    request = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [],
    }
    response = httpx.post(running.url + "chat/completions", json=request, timeout=TIMEOUT)
    assert response.content == (PAYLOADS / "openai_chat_usage.sse").read_bytes()
    assert running.bill()["reason"] == "complete"


@pytest.mark.parametrize("keep", [False, True])
def test_comments_are_dropped_unless_kept(relay: Any, upstream: HTTPServer, keep: bool) -> None:
    body = b": ping\n\nretry: 2500\n\n" + chat_event("hi") + b": note\ndata: [DONE]\n\n"
    upstream.expect_request("/v1/s").respond_with_data(body, content_type="text/event-stream")
    running = proxy(
        relay, upstream.url_for("/v1"), "--once", *(["--keep-comments"] if keep else [])
    )
    got = httpx.get(running.url + "s", timeout=TIMEOUT).content
    if keep:
        assert got == body
    else:
        assert got == b"retry: 2500\n\n" + chat_event("hi") + b"data: [DONE]\n\n"
    assert running.bill()["events"] == 2


def test_non_streaming_json_passes_through_metered_from_its_text_and_usage(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    answer = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Four words of text"}}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12},
    }
    upstream.expect_request("/v1/chat/completions").respond_with_json(answer)
    prices = tmp_path / "prices.toml"
    prices.write_text('["gpt-4o-mini"]\ninput = 1.0\noutput = 2.0\n')
    running = proxy(relay, upstream.url_for("/v1"), "--once", "--prices", str(prices))
    response = httpx.post(running.url + "chat/completions", json={}, timeout=TIMEOUT)
    assert response.json() == answer
    bill = running.bill()
    assert bill["tokens"] == 4
    # A reported 0 stays 0: it is not replaced by the metered count.
    assert bill["upstream_usage"] == {"input_tokens": 12, "output_tokens": 0, "total_tokens": 12}
    # issue 12: the cost is what the upstream reported (12 in, 0 out), not the metered 4.
    assert bill["clients"][0]["cost"] == pytest.approx((12 * 1.0 + 0 * 2.0) / 1e6)
    assert bill["cost"] == pytest.approx((12 * 1.0 + 0 * 2.0) / 1e6)
    assert bill["usage_source"] == "reported"


# --------------------------------------------------------------------------- disconnects


def test_client_disconnect_closes_the_upstream_at_once_and_bills_exactly(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    # "Hello", " wor", "ld again": three deltas, three tokens (a word split across two).
    events = [chat_event("Hello"), chat_event(" wor"), chat_event("ld again")]
    server = raw_upstream(events, then="hold")
    running = proxy(relay, server.url, "--once")
    host, port = running.url.removeprefix("http://").rstrip("/").split(":")
    body = b'{"model": "gpt-4o-mini", "stream": true}'
    client = socket.create_connection((host, int(port)), timeout=10)
    client.sendall(
        b"POST /chat/completions HTTP/1.1\r\nHost: proxy\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = b""
    deadline = time.monotonic() + 10
    while received.count(b"data: ") < 3 and time.monotonic() < deadline:
        received += client.recv(65536)
    assert received.count(b"data: ") == 3
    assert not server.closed.is_set()  # the upstream is still there, holding the stream open
    client_closed_at = time.monotonic()
    client.close()
    assert server.closed.wait(5), "the upstream never saw its connection close"
    assert server.closed_at is not None
    delay = server.closed_at - client_closed_at
    print(f"\nclient close -> upstream socket close: {delay * 1000:.2f} ms")
    assert delay < 0.5
    bill = running.bill()
    assert running.proc.returncode == EXIT_DISCONNECTED
    assert bill["reason"] == "client_disconnected"
    row = bill["clients"][0]
    assert (row["tokens"], row["events"], row["bytes"]) == (3, 3, sum(map(len, events)))
    assert row["partial"] is True
    assert row["upstream_usage"] is None
    no_traceback(running)


def test_client_disconnect_while_the_upstream_streams_closes_it_within_milliseconds(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    server = raw_upstream([], then="stream")
    running = proxy(relay, server.url, "--once")
    with httpx.Client(timeout=TIMEOUT) as client:
        response = client.send(client.build_request("POST", running.url), stream=True)
        seen = 0
        for chunk in response.iter_raw():
            seen += chunk.count(b"data: ")
            if seen >= 10:
                break
        client_closed_at = time.monotonic()
        response.close()  # a streamed response closed early: httpx closes its connection
    assert server.closed.wait(5)
    assert server.closed_at is not None
    delay = server.closed_at - client_closed_at
    print(f"\nclient close -> upstream socket close, upstream streaming: {delay * 1000:.2f} ms")
    assert delay < 0.5
    bill = running.bill()
    assert bill["reason"] == "client_disconnected"
    row = bill["clients"][0]
    assert row["events"] >= 10
    assert row["tokens"] == row["events"]  # one word per event, each billed once delivered
    assert row["partial"] is True


def test_client_leaving_before_the_upstream_answers_closes_the_upstream(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    server = raw_upstream([], then="hold", answer=False)
    running = proxy(relay, server.url, "--once")
    host, port = running.url.removeprefix("http://").rstrip("/").split(":")
    client = socket.create_connection((host, int(port)), timeout=10)
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert server.sent.wait(10)  # the upstream has the request and sends nothing
    client_closed_at = time.monotonic()
    client.close()
    assert server.closed.wait(5)
    assert server.closed_at is not None
    assert server.closed_at - client_closed_at < 0.5
    bill = running.bill()
    assert bill["reason"] == "client_disconnected"
    assert bill["tokens"] == 0
    assert running.proc.returncode == EXIT_DISCONNECTED


# --------------------------------------------------------------------------- upstream errors


def assert_upstream_error(running: Relay, message: str) -> dict[str, Any]:
    bill = running.bill()
    assert running.proc.returncode == EXIT_UPSTREAM_ERROR
    assert bill["reason"] == "upstream_error"
    assert bill["clients"][0]["reason"] == "upstream_error"
    errors = error_lines(running)
    assert len(errors) == 1, running.stderr
    assert message in errors[0], errors
    no_traceback(running)
    assert SECRET not in running.stderr
    return bill


def test_refused_connection(relay: Any) -> None:
    port = free_port()
    running = proxy(
        relay, f"http://127.0.0.1:{port}/v1", "--once", "--upstream-header", f"X-Key: {SECRET}"
    )
    response = httpx.get(running.url, timeout=TIMEOUT)
    assert response.status_code == 502
    assert f"upstream 127.0.0.1:{port} refused the connection" in response.text
    assert_upstream_error(running, f"upstream 127.0.0.1:{port} refused the connection")


def test_once_says_the_request_error_once(relay: Any) -> None:
    """With --once the request's error is the run's: the receipt leaves it to the error line."""
    port = free_port()
    running = proxy(relay, f"http://127.0.0.1:{port}/v1", "--once")
    assert httpx.get(running.url, timeout=TIMEOUT).status_code == 502
    assert_upstream_error(running, "refused the connection")
    lines = running.stderr.splitlines()
    assert [line for line in lines if "refused the connection" in line] == [
        f"sserelay: error: upstream 127.0.0.1:{port} refused the connection"
    ], running.stderr
    assert any(line.endswith(" · upstream_error") for line in lines), running.stderr  # the receipt


def test_dns_failure(relay: Any) -> None:
    running = proxy(relay, "http://no-such-host.invalid/v1", "--once")
    assert httpx.get(running.url, timeout=TIMEOUT).status_code == 502
    assert_upstream_error(running, "cannot resolve upstream host 'no-such-host.invalid'")


def test_read_timeout_mid_stream_cuts_the_client_and_closes_the_upstream(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    server = raw_upstream([chat_event("only")], then="hold")
    running = proxy(relay, server.url, "--once", "--read-timeout", "0.3")
    with pytest.raises(httpx.RemoteProtocolError):  # cut, not ended: the client can tell
        httpx.post(running.url + "chat/completions", json={}, timeout=TIMEOUT)
    bill = assert_upstream_error(running, "sent nothing for 0.3 s")
    assert "(read timeout)" in error_lines(running)[0]
    assert bill["tokens"] == 1
    assert server.closed.wait(5)


def test_read_timeout_before_the_answer_is_a_504(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    server = raw_upstream([], then="hold", answer=False)
    running = proxy(relay, server.url, "--once", "--read-timeout", "0.3")
    assert httpx.get(running.url, timeout=TIMEOUT).status_code == 504
    assert_upstream_error(running, "before its response (read timeout)")


def test_http_500_passes_through_with_its_body(relay: Any, upstream: HTTPServer) -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    upstream.expect_request("/v1/chat/completions").respond_with_json(error, status=500)
    running = proxy(relay, upstream.url_for("/v1"), "--once")
    response = httpx.post(running.url + "chat/completions", json={}, timeout=TIMEOUT)
    assert response.status_code == 500
    assert response.json() == error
    bill = assert_upstream_error(running, "upstream answered 500 INTERNAL SERVER ERROR")
    assert "The server had an error" in error_lines(running)[0]
    assert bill["clients"][0]["upstream_status"] == 500
    assert bill["tokens"] == 0


def test_body_dying_mid_stream(relay: Any, raw_upstream: Callable[..., RawUpstream]) -> None:
    server = raw_upstream([chat_event("two words")], then="die")
    running = proxy(relay, server.url, "--once")
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", running.url + "chat/completions", json={}, timeout=TIMEOUT) as r,
    ):
        for _ in r.iter_raw():
            pass
    bill = assert_upstream_error(running, "closed the connection mid-stream")
    assert (bill["tokens"], bill["events"]) == (2, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'data: {"a": 1}\n\n{"error": "not SSE"}\n\n', "upstream sent a line that is not SSE"),
        (b'data: {"a": 1}\n\ndata: {"cut', "ended in the middle of an event"),
    ],
)
def test_malformed_sse(relay: Any, upstream: HTTPServer, body: bytes, message: str) -> None:
    upstream.expect_request("/v1/s").respond_with_data(body, content_type="text/event-stream")
    running = proxy(relay, upstream.url_for("/v1"), "--once")
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", running.url + "s", timeout=TIMEOUT) as response,
    ):
        for _ in response.iter_raw():
            pass
    bill = assert_upstream_error(running, message)
    assert bill["events"] == 1


def test_bad_upstream_header_is_a_usage_error_that_does_not_show_it(relay: Any) -> None:
    running = relay(
        "proxy", "--upstream", "http://127.0.0.1:9/", "--upstream-header", SECRET, wait_ready=False
    )
    assert running.wait() == 2
    assert "--upstream-header" in running.stderr
    assert SECRET not in running.stderr


def test_text_bill_shows_each_request_and_the_per_model_cost(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    upstream.expect_request("/v1/chat/completions").respond_with_handler(
        replay("openai_chat_usage.sse")
    )
    prices = tmp_path / "prices.toml"
    prices.write_text('["gpt-4o-mini"]\ninput = 0.15\noutput = 0.6\n')
    running: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/v1"), "--once", "--prices", str(prices)
    )
    httpx.post(running.url + "chat/completions", json={"stream": True}, timeout=TIMEOUT)
    running.wait()
    text = running.stdout()
    assert text.startswith("sserelay bill: complete\n")
    cost = (24 * 0.15 + 7 * 0.6) / 1e6  # issue 12: the reported usage, 24 in and 7 out
    assert f"cost        {cost:.6f}".rstrip("0") + " (per-model prices)" in text
    assert "POST /chat/completions 200 gpt-4o-mini-2024-07-18 upstream in=24 out=7" in text
    receipts = [line for line in running.stderr.splitlines() if "· complete" in line]
    # An access log line: the UTC time it ended, its request id, then what it was.
    assert len(receipts) == 1
    assert re.match(
        r"sserelay: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z req_[0-9a-f]{24} "
        r"POST /chat/completions 200",
        receipts[0],
    ), receipts[0]


def test_an_idle_sse_upstream_gets_heartbeats_to_the_client(
    relay: Any, raw_upstream: Callable[..., RawUpstream]
) -> None:
    server = raw_upstream([chat_event("hi")], then="hold")
    running = proxy(relay, server.url, "--once", "--heartbeat", "0.05")
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream("POST", running.url, json={}) as response,
    ):
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if received.count(b": ping\n\n") >= 2:
                break
    assert received.startswith(chat_event("hi"))
    bill = running.bill()
    assert (bill["reason"], bill["events"], bill["tokens"]) == ("client_disconnected", 1, 1)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_stream_cuts_it_closes_the_upstream_and_bills_it(
    relay: Any, raw_upstream: Callable[..., RawUpstream], signum: int, code: int
) -> None:
    server = raw_upstream([chat_event("one two")], then="hold")
    running = proxy(relay, server.url)
    with (
        httpx.Client(timeout=TIMEOUT) as client,
        client.stream("POST", running.url, json={}) as response,
    ):
        chunks = response.iter_raw()
        assert next(chunks) == chat_event("one two")
        running.signal(signum)
        with pytest.raises(httpx.RemoteProtocolError):  # cut, not ended
            for _ in chunks:
                pass
    assert server.closed.wait(5)
    bill = running.bill()
    assert running.proc.returncode == code
    assert bill["reason"] == "interrupted"
    assert bill["clients"][0]["reason"] == "interrupted"
    assert bill["tokens"] == 2
    no_traceback(running)
