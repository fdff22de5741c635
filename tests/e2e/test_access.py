"""Every access option is honoured on every command where it makes sense, or refused (issue
18): `--auth-token`, `--max-clients` and `--cors-origin` (with preflights) on the mock and the
proxy, answered in the API's error shape so the SDK says why; `--keep`, `--history` and
`--max-lag` with `--as` are usage errors, not silently ignored."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Relay, wait_until

TOKEN = "sk-relay-access-0123456789"
ORIGIN = "https://app.example"
ANSWER = "".join(f"word{n}\n" for n in range(60))  # a line each: paced one by one


@pytest.fixture
def answer(tmp_path: Path) -> Path:
    path = tmp_path / "answer.txt"
    path.write_text(ANSWER)
    return path


def mock(relay: Any, answer: Path, *args: str) -> Relay:
    running: Relay = relay("serve", str(answer), "--as", "openai", "--no-ledger", *args)
    return running


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key=key, max_retries=0)


def ask(client: openai.OpenAI) -> str:
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    return answer.choices[0].message.content or ""


@pytest.mark.parametrize("command", ["mock", "proxy"])
def test_auth_token_is_checked_as_the_sdk_sends_it(relay: Any, answer: Path, command: str) -> None:
    upstream = mock(relay, answer)
    if command == "mock":
        url = mock(relay, answer, "--auth-token", TOKEN).url
    else:
        proxy: Relay = relay(
            "proxy", "--upstream", upstream.url, "--auth-token", TOKEN, "--no-ledger"
        )
        url = proxy.url
    with pytest.raises(openai.AuthenticationError) as refused, sdk(url, "sk-wrong") as client:
        ask(client)
    assert "token" in refused.value.message  # our message, read by the SDK
    with sdk(url, TOKEN) as client:
        assert ask(client).split() == ANSWER.split()


def test_the_proxy_never_forwards_the_clients_token(relay: Any, answer: Path) -> None:
    upstream = mock(relay, answer, "--auth-token", "sk-upstream-only-0123")
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url, "--auth-token", TOKEN, "--no-ledger",
        "--upstream-header", "Authorization: Bearer sk-upstream-only-0123",
    )  # fmt: skip
    with sdk(proxy.url, TOKEN) as client:  # the upstream takes only its own credential
        assert ask(client).split() == ANSWER.split()


@pytest.mark.parametrize("command", ["mock", "proxy"])
def test_max_clients_answers_503_in_the_apis_shape(relay: Any, answer: Path, command: str) -> None:
    upstream = mock(relay, answer, "--rate", "100")  # a 60-word answer takes ~0.6 s
    if command == "mock":
        url = mock(relay, answer, "--rate", "100", "--max-clients", "1").url
    else:
        proxy: Relay = relay(
            "proxy", "--upstream", upstream.url, "--max-clients", "1", "--no-ledger"
        )
        url = proxy.url
    started = threading.Event()

    def first() -> None:
        with sdk(url, "k") as client:
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
            for _ in stream:
                started.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(openai.APIStatusError) as refused, sdk(url, "k") as client:
            ask(client)
        assert refused.value.status_code == 503
        assert "clients" in refused.value.message
    finally:
        thread.join(10)


@pytest.mark.parametrize("command", ["mock", "proxy"])
def test_cors_preflights_are_answered_and_answers_carry_the_origin(
    relay: Any, answer: Path, command: str
) -> None:
    upstream = mock(relay, answer)
    if command == "mock":
        url = mock(relay, answer, "--cors-origin", ORIGIN).url
    else:
        proxy: Relay = relay(
            "proxy", "--upstream", upstream.url, "--cors-origin", ORIGIN, "--no-ledger"
        )
        url = proxy.url
    path = url + "v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        preflight = client.options(
            path,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        answered = client.post(path, json=body, headers={"Origin": ORIGIN})
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == ORIGIN
    if command == "proxy":  # the preflight was the proxy's to answer, never forwarded
        wait_until(lambda: "POST /v1/chat/completions" in upstream.stderr)
        assert "OPTIONS" not in upstream.stderr


@pytest.mark.parametrize("option", [["--keep"], ["--history", "10"], ["--max-lag", "10"]])
def test_broadcast_options_with_as_are_usage_errors(answer: Path, option: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sserelay", "serve", str(answer), "--as", "openai", *option],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert option[0] in done.stderr and "Traceback" not in done.stderr
