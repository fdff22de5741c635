"""`sserelay serve FILE --as PROVIDER` end to end: the real CLI answering the official SDKs."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from sserelay import count_tokens
from tests.conftest import EXAMPLE, Relay, wait_until

TEXT = EXAMPLE.read_text()
PROMPT: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "Tell me about streams."}]},
]
PROMPT_TOKENS = count_tokens("You are terse.") + count_tokens("Tell me about streams.")


def mock(relay: Any, provider: str, *args: str, **kwargs: Any) -> Relay:
    running: Relay = relay("serve", str(EXAMPLE), "--as", provider, "--json", *args, **kwargs)
    return running


def stop(running: Relay) -> dict[str, Any]:
    running.signal(signal.SIGINT)
    bill = running.bill()
    assert running.proc.returncode == 130
    assert "Traceback" not in running.stderr, running.stderr
    return bill


def test_openai_sdk_streams_and_gets_whole_answers(relay: Any) -> None:
    running = mock(relay, "openai")
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"gpt-4o-mini"}  # the request's model, echoed
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, count_tokens(TEXT))

    whole = client.chat.completions.create(model="gpt-x", messages=PROMPT)
    assert whole.choices[0].message.content == TEXT and whole.model == "gpt-x"
    assert whole.usage is not None and whole.usage.completion_tokens == count_tokens(TEXT)
    assert [m.id for m in client.models.list()] == ["sserelay-mock"]

    # Without include_usage: no usage chunk; the raw body is what the bill counts.
    body = httpx.post(
        running.url + "chat/completions",  # the path without /v1 works too
        json={"model": "m", "messages": [], "stream": True},
        timeout=10,
    ).content
    blocks = body.split(b"\n\n")[:-1]
    assert blocks[-1] == b"data: [DONE]" and b'"usage"' not in body
    client.close()

    bill = stop(running)
    rows = bill["clients"]
    assert [r["reason"] for r in rows] == ["complete"] * 3
    assert [r["tokens"] for r in rows] == [count_tokens(TEXT)] * 3
    lines = TEXT.count("\n")
    assert rows[0]["events"] == lines + 4  # role, one per line, finish, usage, [DONE]
    assert rows[1]["events"] == 1  # one whole answer
    assert (rows[2]["events"], rows[2]["bytes"]) == (len(blocks), len(body))
    assert (rows[0]["method"], rows[0]["path"], rows[0]["model"]) == (
        "POST",
        "/v1/chat/completions",
        "gpt-4o-mini",
    )


def test_anthropic_sdk_streams_and_gets_whole_messages(relay: Any) -> None:
    running = mock(relay, "anthropic")
    client = anthropic.Anthropic(base_url=running.url.rstrip("/"), api_key="any", max_retries=0)
    with client.messages.stream(
        model="claude-mock-1",
        max_tokens=1024,
        system="You are terse.",
        messages=[{"role": "user", "content": "Tell me about streams."}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.model == "claude-mock-1" and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        PROMPT_TOKENS,
        count_tokens(TEXT),
    )
    whole = client.messages.create(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert whole.content[0].type == "text" and whole.content[0].text == TEXT
    assert whole.usage.input_tokens == 1
    client.close()
    bill = stop(running)
    assert [(r["tokens"], r["reason"]) for r in bill["clients"]] == [
        (count_tokens(TEXT), "complete")
    ] * 2


def test_openai_responses_sdk_streams_and_gets_whole_responses(relay: Any) -> None:
    running = mock(relay, "openai-responses", "--once")
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    with client.responses.stream(model="gpt-4.1", input="Tell me about streams.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == TEXT and final.output_text == TEXT
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, count_tokens(TEXT))
    client.close()
    bill = running.bill()  # --once: the first request's bill, exit 0
    assert running.proc.returncode == 0 and bill["reason"] == "complete"


def test_text_with_quotes_backslashes_and_line_ends_round_trips(relay: Any, tmp_path: Path) -> None:
    text = 'He said "hi"\\n, then\ttabbed; emoji 🚀 and </script> too.\nSecond line\r\n\nlast'
    source = tmp_path / "tricky.txt"
    source.write_bytes(text.encode())
    running: Relay = relay("serve", str(source), "--as", "openai", "--chunk", "raw", "--json")
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    client.close()
    assert stop(running)["tokens"] == count_tokens(text)


def test_stdin_is_read_once_and_every_request_gets_all_of_it(relay: Any) -> None:
    with EXAMPLE.open("rb") as stdin:
        running: Relay = relay("serve", "--as", "openai", "--json", stdin=stdin)
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    for _ in range(2):
        answer = client.chat.completions.create(model="m", messages=[])
        assert answer.choices[0].message.content == TEXT
    client.close()
    assert [r["reason"] for r in stop(running)["clients"]] == ["complete", "complete"]


def test_an_sdk_client_that_hangs_up_mid_stream_is_metered_like_any_other(relay: Any) -> None:
    # stdin is fed by the test: the stream waits for the second line that never comes.
    running: Relay = relay("serve", "--as", "openai", "--once", "--json")
    running.feed("first line here\n")
    client = openai.OpenAI(base_url=running.url + "v1", api_key="any", max_retries=0)
    stream = client.chat.completions.create(model="m", messages=[], stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    assert next(chunks).choices[0].delta.content == "first line here\n"
    stream.close()
    client.close()
    bill = running.bill()
    assert running.proc.returncode == 3
    (row,) = bill["clients"]
    assert (row["reason"], row["tokens"], row["events"]) == ("client_disconnected", 3, 2)
    assert bill["reason"] == "client_disconnected"


def test_a_bad_request_gets_a_provider_error_and_is_not_billed(relay: Any) -> None:
    running = mock(relay, "anthropic")
    client = anthropic.Anthropic(base_url=running.url.rstrip("/"), api_key="any", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="'messages' must be a list"):
        client.messages.create(model="m", max_tokens=1, messages=None)  # type: ignore[call-overload]
    answer = httpx.get(running.url + "v1/nothing-here", timeout=10)
    assert answer.status_code == 404 and answer.json()["type"] == "error"
    client.close()
    wait_until(lambda: "serving on" in running.stderr)
    assert stop(running)["clients"] == []


def test_a_missing_file_is_one_error_line(relay: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    running: Relay = relay("serve", str(missing), "--as", "openai", wait_ready=False)
    assert running.wait() == 5
    assert running.stderr.strip().startswith(f"sserelay: error: cannot open {missing}")
    assert "Traceback" not in running.stderr


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem")
def test_once_says_the_request_error_once(relay: Any) -> None:
    """With --once the request's error is the run's: the receipt leaves it to the error line."""
    # It opens at the start, but reading it fails (address 0 is not mapped): the request fails.
    running: Relay = relay("serve", "/proc/self/mem", "--as", "openai", "--once", "--json")
    request = {"model": "m", "messages": [], "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):  # cut after its first event
        httpx.post(running.url + "v1/chat/completions", json=request, timeout=10)
    assert running.bill()["reason"] == "input_error"
    assert running.proc.returncode == 5
    lines = running.stderr.splitlines()
    assert [line for line in lines if "cannot read /proc/self/mem" in line] == [
        "sserelay: error: cannot read /proc/self/mem: Input/output error"
    ], running.stderr
    assert any(line.endswith(" · input_error") for line in lines), running.stderr  # the receipt


def test_once_serves_exactly_one_of_two_requests_that_arrive_together(relay: Any) -> None:
    """Both requests pass the door before either has sent its body; only one is answered."""
    running = mock(relay, "openai", "--once")
    url = httpx.URL(running.url)
    assert url.port is not None
    body = b'{"model": "m", "messages": [], "stream": true}'
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    sockets = [socket.create_connection((url.host, url.port), timeout=10) for _ in range(2)]
    for sock in sockets:
        sock.sendall(head)
    for sock in sockets:  # uvicorn says 100 Continue once the endpoint reads the body
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
    for sock in sockets:
        sock.sendall(body)
    answers = []
    for sock in sockets:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        answers.append(data)
    statuses = sorted(answer.split(b" ", 2)[1] for answer in answers)
    assert statuses == [b"200", b"503"], answers
    bill = running.bill()
    assert running.proc.returncode == 0
    assert [row["reason"] for row in bill["clients"]] == ["complete"]
