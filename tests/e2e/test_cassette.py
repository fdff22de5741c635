"""Cassettes end to end: `proxy --record` records every exchange of an SDK's session against a
pytest-httpserver upstream, and `serve CASSETTE --as recorded` answers the official `openai`
SDK offline, each request with its own recorded answer whatever the order they come in;
`--as PROVIDER` gives the recorded texts to another provider's SDK. An existing file is
never overwritten by accident.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from sserelay.record.format import Block, Exchange, Header, file_line
from sserelay.record.replay import load_recording
from tests.conftest import Relay

MODEL = "gpt-rec"
#: The upstream's answers, by question; the first is streamed, the second answered whole.
ANSWERS = {
    "Who are you?": ["I am", " a recording", " of", " an", " API."],
    "And the weather?": ["Sunny", " all", " day."],
}
WHO, WEATHER = ANSWERS


def chat_event(content: str) -> bytes:
    chunk = {
        "id": "chatcmpl-rec",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def answer_chat(request: Request) -> Response:
    """A chat upstream that answers each question its own way, with its own request id."""
    asked = request.get_json()
    question = asked["messages"][-1]["content"]
    words = ANSWERS[question]
    headers = {"x-request-id": f"req_{len(question)}", "set-cookie": "session=upstream"}
    if asked.get("stream"):
        events = [chat_event(word) for word in words] + [b"data: [DONE]\n\n"]
        return Response(iter(events), content_type="text/event-stream", headers=headers)
    whole = {
        "id": "chatcmpl-whole",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(words)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
    }
    return Response(json.dumps(whole), content_type="application/json", headers=headers)


def models(request: Request) -> Response:
    listed = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1}]}
    return Response(json.dumps(listed), content_type="application/json")


def ask(client: openai.OpenAI, question: str, *, stream: bool) -> tuple[str, str | None]:
    """The answer's text and its request id, as the SDK gives them."""
    messages: Any = [{"role": "user", "content": question}]
    if not stream:
        completion = client.chat.completions.create(model=MODEL, messages=messages)
        return completion.choices[0].message.content or "", completion._request_id
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, stream=True
    )
    with raw.parse() as chunks:
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    return "".join(deltas), raw.headers.get("x-request-id")


def record_session(relay: Any, upstream: HTTPServer, path: Path, *args: str) -> dict[str, Any]:
    """An app's session through `proxy --record PATH`: the model list, a streamed question,
    a whole one. Returns the proxy's bill (the session ends with Ctrl-C)."""
    upstream.expect_request("/v1/models", method="GET").respond_with_handler(models)
    upstream.expect_request("/v1/chat/completions", method="POST").respond_with_handler(answer_chat)
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/v1"), "--record", str(path), *args, "--json"
    )
    with openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=0) as client:
        assert [model.id for model in client.models.list()] == [MODEL]
        # Through the proxy, x-request-id is the gateway's (the ledger row's); the upstream's
        # own (req_12, req_16) is recorded, and what a replay gives back.
        for question, stream in ((WHO, True), (WEATHER, False)):
            text, request_id = ask(client, question, stream=stream)
            assert text == "".join(ANSWERS[question])
            assert request_id is not None and re.fullmatch(r"req_[0-9a-f]{24}", request_id)
    proxy.signal(signal.SIGINT)
    bill: dict[str, Any] = proxy.bill()
    return bill


def billed(bill: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What each request was billed, in the order of its path and body."""
    keys = ("method", "path", "tokens", "events", "bytes", "upstream_status", "upstream_usage")
    return sorted(tuple(json.dumps(client[key]) for key in keys) for client in bill["clients"])


def test_a_recorded_session_answers_the_openai_sdk_offline_in_any_order(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    path = tmp_path / "session.jsonl"
    recorded_bill = record_session(relay, upstream, path)
    cassette = load_recording(str(path))
    assert [(e.number, e.method, e.path, e.status) for e in cassette.exchanges] == [
        (1, "GET", "/models", 200),
        (2, "POST", "/chat/completions", 200),
        (3, "POST", "/chat/completions", 200),
    ]
    assert all(e.complete for e in cassette.exchanges)
    assert ("x-request-id", "req_12") in cassette.exchanges[1].headers
    assert "session=upstream" not in path.read_text()  # no cookie is recorded

    upstream.clear()  # offline from here on: the upstream would fail the test if called
    replay: Relay = relay("serve", str(path), "--as", "recorded", "--json", "--quiet")
    with openai.OpenAI(base_url=replay.url, api_key="k", max_retries=0) as client:
        # The other way round: each request still gets its own answer, request id and all.
        assert ask(client, WEATHER, stream=False) == ("".join(ANSWERS[WEATHER]), "req_16")
        assert [model.id for model in client.models.list()] == [MODEL]
        assert ask(client, WHO, stream=True) == ("".join(ANSWERS[WHO]), "req_12")
        # Asked again: the same answer again (a retry).
        assert ask(client, WHO, stream=True) == ("".join(ANSWERS[WHO]), "req_12")
        with pytest.raises(openai.NotFoundError) as info:
            ask(client, "Something never recorded?", stream=False)
    assert "no recorded exchange for POST /chat/completions (body sha256 " in info.value.message, (
        info.value.message
    )
    assert upstream.log == []
    replay.signal(signal.SIGINT)
    replayed_bill = replay.bill()
    assert replay.wait() == 130
    # A replay bills what the recorded session billed: the same relays read the same bytes.
    replayed, recorded = billed(replayed_bill), billed(recorded_bill)
    assert set(replayed) == set(recorded) and len(replayed) == len(recorded) + 1  # the retry


def test_a_recorded_session_gives_its_texts_to_another_provider_s_sdk(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    path = tmp_path / "session.jsonl"
    record_session(relay, upstream, path)
    upstream.clear()
    mock: Relay = relay("serve", str(path), "--as", "anthropic", "--json", "--quiet")
    # The mock answers the model list itself; its completions are the recorded POSTs, in order.
    claude = anthropic.Anthropic(base_url=mock.url.rstrip("/"), api_key="k", max_retries=0)
    texts = []
    for _ in ANSWERS:
        message = claude.messages.create(
            model="claude-rec", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
        texts.append("".join(block.text for block in message.content if block.type == "text"))
    assert texts == ["".join(words) for words in ANSWERS.values()]
    with pytest.raises(anthropic.NotFoundError, match="no recorded exchange for POST /v1/messages"):
        claude.messages.create(
            model="claude-rec", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
    claude.close()


def sserelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sserelay", *args, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([], "{path} exists: give --force to overwrite it or --append to add to it"),
        (["--force", "--append"], "--force overwrites the recording, --append adds to it"),
    ],
)
def test_an_existing_recording_is_never_overwritten_by_accident(
    tmp_path: Path, extra: list[str], error: str
) -> None:
    path = tmp_path / "precious.jsonl"
    path.write_text("precious\n")
    result = sserelay("proxy", "--upstream", "http://127.0.0.1:9/", "--record", str(path), *extra)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and error.format(path=path) in errors[0], result.stderr
    assert path.read_text() == "precious\n"


def test_force_and_append_go_with_record() -> None:
    result = sserelay("proxy", "--upstream", "http://127.0.0.1:9/", "--append")
    assert result.returncode == 2 and "--append goes with --record" in result.stderr


def test_append_adds_to_a_cassette_and_force_starts_it_again(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    upstream.expect_request("/v1/models").respond_with_handler(models)
    path = tmp_path / "cassette.jsonl"

    def one_request(*args: str) -> None:
        proxy: Relay = relay(
            "proxy", "--upstream", upstream.url_for("/"), "--record", str(path), "--once", *args
        )
        assert httpx.get(proxy.url + "v1/models", timeout=10).json()["data"][0]["id"] == MODEL
        assert proxy.wait() == 0

    one_request()
    one_request("--append")
    one_request("--append")
    assert [e.number for e in load_recording(str(path)).exchanges] == [1, 2, 3]
    assert path.read_text().count("sserelay_recording") == 1
    one_request("--force")
    assert [e.number for e in load_recording(str(path)).exchanges] == [1]


def test_append_refuses_a_version_1_recording(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    path.write_text(Header("GET", "/", 200, "text/plain").line())
    result = sserelay(
        "proxy", "--upstream", "http://127.0.0.1:9/", "--record", str(path), "--append"
    )
    assert result.returncode == 2 and "it is a version 1 recording" in result.stderr


def test_serve_refuses_to_broadcast_a_cassette_of_several_exchanges(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    headers = (("content-type", "application/json"),)
    path.write_text(
        file_line()
        + Exchange(1, "GET", "/models", None, 200, headers).opening_line()
        + Exchange(2, "GET", "/models", None, 200, headers).opening_line()
    )
    result = sserelay("serve", str(path))
    assert result.returncode == 2
    assert "holds 2 recorded exchanges" in result.stderr and "--as recorded" in result.stderr
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    result = sserelay("serve", str(text), "--as", "recorded")
    assert result.returncode == 2 and "--as recorded replays a recording" in result.stderr


def test_overlapping_requests_are_recorded_interleaved_each_whole(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    # Each upstream answer waits for the other's first event before its second: the two
    # answers are relayed, and so recorded, interleaved.
    first_sent = {"a": threading.Event(), "b": threading.Event()}

    def answer(request: Request) -> Response:
        me = request.get_json()["name"]
        other = "b" if me == "a" else "a"

        def body() -> Iterator[bytes]:
            yield chat_event(f"{me}1")
            first_sent[me].set()
            first_sent[other].wait(10)
            yield chat_event(f"{me}2")
            yield b"data: [DONE]\n\n"

        return Response(body(), content_type="text/event-stream")

    upstream.expect_request("/v1/chat/completions").respond_with_handler(answer)
    path = tmp_path / "overlap.jsonl"
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/v1"), "--record", str(path), "--quiet"
    )

    def stream(name: str) -> None:
        url = proxy.url + "chat/completions"
        with httpx.stream("POST", url, json={"name": name}, timeout=10) as response:
            response.read()

    clients = [threading.Thread(target=stream, args=(name,)) for name in "ab"]
    for client in clients:
        client.start()
    for client in clients:
        client.join(10)
    proxy.signal(signal.SIGINT)
    assert proxy.wait() == 130

    numbers = [json.loads(line)["exchange"] for line in path.read_text().splitlines()[1:]]
    assert numbers != sorted(numbers)  # interleaved on disk
    exchanges = load_recording(str(path)).exchanges
    assert len(exchanges) == 2 and all(exchange.complete for exchange in exchanges)
    answers = sorted(
        [part.data for part in exchange.parts if isinstance(part, Block)] for exchange in exchanges
    )
    assert answers == [
        [chat_event(f"{me}{i}")[6:-2].decode() for i in (1, 2)] + ["[DONE]"] for me in "ab"
    ]
