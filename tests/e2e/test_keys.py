"""Keys, budgets and rate limits, enforced mid-stream (issue 14): the real openai and
anthropic SDKs, the real CLI, a real ledger.

A key with a budget of 30 tokens asking for a 100-token answer gets at most 30 tokens: the
SDK raises mid-stream with an error naming the budget, the ledger row has exactly the
tokens the client received, and the upstream's connection is closed at once. The next
request is refused with 429 and Retry-After; a restart does not give the budget back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from sserelay import count_tokens
from tests.conftest import Relay, wait_until

WORDS = 100
ANSWER = " ".join(f"word{n}" for n in range(WORDS)) + "\n"
SECRETS = {name: f"sk-relay-test-{name}-0123456789" for name in ("alice", "bob", "carol", "dave")}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[keys.alice]
secret_sha256 = "{digest(SECRETS["alice"])}"
budget_tokens = 30
period = "day"

[keys.bob]
secret_sha256 = "{digest(SECRETS["bob"])}"

[keys.carol]
secret_sha256 = "{digest(SECRETS["carol"])}"
models = ["gpt-4o-mini"]

[keys.dave]
secret_sha256 = "{digest(SECRETS["dave"])}"
budget_tokens = 30
period = "day"
"""
    )
    return path


@pytest.fixture
def answer_file(tmp_path: Path) -> Path:
    path = tmp_path / "answer.txt"
    path.write_text(ANSWER)
    return path


def gateway(
    relay: Any, answer_file: Path, keys_file: Path, ledger: Path, provider: str = "openai"
) -> tuple[Relay, Relay]:
    """A mock upstream that streams the 100-word answer word by word, and a proxy with keys."""
    upstream: Relay = relay(
        "serve", str(answer_file), "--as", provider, "--chunk", "word", "--rate", "400",
        "--no-ledger", "--json",
    )  # fmt: skip
    # The openai SDK's base URL ends in /v1 (the proxy's root is the upstream's /v1); the
    # anthropic SDK's does not (its paths start with /v1).
    base = upstream.url + ("v1" if provider == "openai" else "")
    proxy: Relay = relay(
        "proxy", "--upstream", base, "--keys", str(keys_file), "--ledger", str(ledger), "--json",
    )  # fmt: skip
    return upstream, proxy


def openai_client(proxy: Relay, name: str | None) -> openai.OpenAI:
    key = SECRETS[name] if name else "sk-not-a-key"
    return openai.OpenAI(base_url=proxy.url, api_key=key, max_retries=0)


def stream_text(client: openai.OpenAI, received: list[str], model: str = "gpt-4o") -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "count"}], stream=True
    )
    for chunk in stream:
        if chunk.choices:
            received.append(chunk.choices[0].delta.content or "")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`sserelay ARGS`, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", "sserelay", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=check,
        stdin=subprocess.DEVNULL,
    )


def ledger_rows(ledger: Path) -> list[dict[str, Any]]:
    result = cli("usage", "--ledger", str(ledger), "--json", "--by", "key", "--by", "reason")
    groups: list[dict[str, Any]] = json.loads(result.stdout)["groups"]
    return groups


def test_a_budget_stops_the_stream_mid_way_with_an_exact_partial_bill(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.db"
    upstream, proxy = gateway(relay, answer_file, keys_file, ledger)
    received: list[str] = []
    with openai_client(proxy, "alice") as client:
        with pytest.raises(openai.APIError) as raised:
            stream_text(client, received)
        assert "budget" in str(raised.value) and "alice" in str(raised.value)
        text = "".join(received)
        assert 0 < count_tokens(text) <= 30
        # The next request is refused before it starts: 429 with Retry-After.
        with pytest.raises(openai.RateLimitError) as refused:
            stream_text(client, [])
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert "alice" in refused.value.message
    # The upstream saw its connection closed as soon as the budget was spent.
    wait_until(lambda: "client_disconnected" in upstream.stderr, timeout=10)
    proxy.signal(signal.SIGTERM)
    bill = proxy.bill()
    rows = [c for c in bill["clients"] if c.get("key") == "alice"]
    assert [r["reason"] for r in rows] == ["budget_exhausted", "budget_exhausted"]
    assert rows[0]["tokens"] == count_tokens(text)
    assert rows[1]["tokens"] == 0
    groups = ledger_rows(ledger)
    cut = next(g for g in groups if g["key"] == "alice" and g["reason"] == "budget_exhausted")
    assert cut["tokens"] == count_tokens(text) and cut["requests"] == 2
    everything = proxy.stderr + json.dumps(bill) + upstream.stderr + ledger.read_bytes().hex()
    for secret in SECRETS.values():
        assert secret not in everything and secret.encode().hex() not in everything


def spend_alices_budget(relay: Any, answer_file: Path, keys_file: Path, ledger: Path) -> int:
    """One proxy run in which alice's stream is cut at her budget; the tokens she was billed."""
    _, proxy = gateway(relay, answer_file, keys_file, ledger)
    with openai_client(proxy, "alice") as client, pytest.raises(openai.APIError):
        stream_text(client, [])
    proxy.signal(signal.SIGTERM)
    tokens: int = proxy.bill()["clients"][0]["tokens"]
    return tokens


def test_a_restart_does_not_give_the_budget_back(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.db"
    spend_alices_budget(relay, answer_file, keys_file, ledger)
    _, again = gateway(relay, answer_file, keys_file, ledger)
    with openai_client(again, "alice") as client, pytest.raises(openai.RateLimitError):
        stream_text(client, [])


def test_unknown_keys_and_forbidden_models_are_refused_in_the_sdks_shape(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    _, proxy = gateway(relay, answer_file, keys_file, tmp_path / "usage.db")
    with openai_client(proxy, None) as client, pytest.raises(openai.AuthenticationError) as bad:
        stream_text(client, [])
    assert "unknown key" in bad.value.message
    with openai_client(proxy, "carol") as client:
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            stream_text(client, [], model="gpt-4o")
        assert "gpt-4o-mini" in forbidden.value.message
        received: list[str] = []
        stream_text(client, received, model="gpt-4o-mini")
        assert "".join(received) == ANSWER.rstrip()  # word chunks: no trailing line end
    proxy.signal(signal.SIGTERM)
    reasons = sorted(c["reason"] for c in proxy.bill()["clients"])
    assert reasons == ["complete", "forbidden", "unauthorized"]


def test_a_whole_answer_over_the_budget_is_never_delivered(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    _, proxy = gateway(relay, answer_file, keys_file, tmp_path / "usage.db")
    with openai_client(proxy, "alice") as client, pytest.raises(openai.RateLimitError) as cut:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "budget" in cut.value.message
    proxy.signal(signal.SIGTERM)
    row = proxy.bill()["clients"][0]
    assert (row["reason"], row["tokens"]) == ("budget_exhausted", 0)


def test_two_concurrent_streams_of_one_key_never_pass_its_budget(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    _, proxy = gateway(relay, answer_file, keys_file, tmp_path / "usage.db")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {SECRETS['dave']}"}

    async def one(client: httpx.AsyncClient) -> bytes:
        async with client.stream(
            "POST", proxy.url + "chat/completions", json=body, headers=headers
        ) as response:
            return b"".join([chunk async for chunk in response.aiter_raw()])

    async def both() -> list[bytes]:
        async with httpx.AsyncClient(timeout=20) as client:
            return list(await asyncio.gather(one(client), one(client)))

    answers = asyncio.run(both())
    proxy.signal(signal.SIGTERM)
    rows = proxy.bill()["clients"]
    assert sum(row["tokens"] for row in rows) <= 30
    assert all(b"budget_exhausted" in answer for answer in answers)


def test_anthropic_sdk_raises_mid_stream_naming_the_budget(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    _, proxy = gateway(relay, answer_file, keys_file, tmp_path / "usage.db", "anthropic")
    client = anthropic.Anthropic(
        base_url=proxy.url.rstrip("/"), api_key=SECRETS["alice"], max_retries=0
    )
    received = []
    with pytest.raises(anthropic.APIError) as raised:
        with client.messages.stream(
            model="claude-x", max_tokens=1000, messages=[{"role": "user", "content": "count"}]
        ) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert "budget" in str(raised.value)
    assert count_tokens("".join(received)) <= 30
    client.close()


def echo_headers(request: Request) -> Response:
    body = {"headers": dict(request.headers), "query": request.query_string.decode()}
    return Response(json.dumps(body), content_type="application/json")


def test_the_client_secret_never_reaches_the_upstream(
    relay: Any, upstream: HTTPServer, keys_file: Path, tmp_path: Path
) -> None:
    upstream.expect_request("/v1/echo").respond_with_handler(echo_headers)
    proxy: Relay = relay(
        "proxy", "--upstream", upstream.url_for("/v1"), "--keys", str(keys_file), "--no-ledger",
        "--upstream-header", "Authorization: Bearer sk-upstream-own-9999", "--json",
    )  # fmt: skip
    seen = httpx.get(
        proxy.url + "echo?token=" + SECRETS["bob"] + "&q=1",
        headers={"x-api-key": SECRETS["bob"]},
        timeout=10,
    ).json()
    assert seen["headers"]["Authorization"] == "Bearer sk-upstream-own-9999"
    assert "X-Api-Key" not in seen["headers"]
    assert seen["query"] == "q=1"
    proxy.signal(signal.SIGTERM)
    bill = proxy.bill()
    assert bill["clients"][0]["key"] == "bob"
    assert SECRETS["bob"] not in proxy.stderr + json.dumps(bill)


def test_a_bad_keys_file_is_one_line_with_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text('[keys.eve]\nsecret = "sk-relay-eve-secret-1"\nbudget_tokens = -5\n')
    unused = "http://127.0.0.1:9/"
    result = cli(
        "proxy", "--upstream", unused, "--keys", str(bad), "--port", "0", "--no-ledger", check=False
    )
    assert result.returncode == 2
    assert f"{bad}:3" in result.stderr and "sk-relay-eve" not in result.stderr


def test_keys_status_shows_what_each_key_spent(
    relay: Any, answer_file: Path, keys_file: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.db"
    spent = spend_alices_budget(relay, answer_file, keys_file, ledger)
    result = cli("keys", "status", "--keys", str(keys_file), "--ledger", str(ledger), "--json")
    rows = {row["name"]: row for row in json.loads(result.stdout)["keys"]}
    assert rows["alice"]["spent_tokens"] == spent
    assert rows["alice"]["remaining_tokens"] == 30 - spent
    assert rows["bob"]["budget_tokens"] is None


def test_a_rate_limit_refuses_the_next_request_and_never_cuts_a_running_stream(
    relay: Any, answer_file: Path, tmp_path: Path
) -> None:
    secret = "sk-relay-test-erin-0123456789"
    keys = tmp_path / "rate.toml"
    keys.write_text(f'[keys.erin]\nsecret_sha256 = "{digest(secret)}"\ntokens_per_minute = 20\n')
    _, proxy = gateway(relay, answer_file, keys, tmp_path / "usage.db")
    received: list[str] = []
    with openai.OpenAI(base_url=proxy.url, api_key=secret, max_retries=0) as client:
        stream_text(client, received)  # far past 20 tokens: the running stream is never cut
        assert "".join(received).split() == ANSWER.split()
        with pytest.raises(openai.RateLimitError) as refused:
            stream_text(client, [])
    assert "erin" in refused.value.message and "minute" in refused.value.message
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 60
    proxy.signal(signal.SIGTERM)
    rows = proxy.bill()["clients"]
    assert [r["reason"] for r in rows] == ["complete", "rate_limited"]
    assert rows[1]["tokens"] == 0


def test_serve_stops_one_clients_stream_at_its_keys_budget_and_not_the_others(
    relay: Any, answer_file: Path, keys_file: Path
) -> None:
    # The file is read at once: one batch of 100 events, of which alice is given the 30
    # that fit her budget (the hub's batches are cut at an event, not whole).
    served: Relay = relay(
        "serve", str(answer_file), "--keys", str(keys_file), "--chunk", "word", "--json",
    )  # fmt: skip

    def events(name: str) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        url = f"{served.url}?token={SECRETS[name]}"
        with httpx.stream("GET", url, timeout=30) as response:
            assert response.status_code == 200
            kind = "message"
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    got.append((kind, line[6:]))
                    kind = "message"
        return got

    alice = events("alice")  # a budget of 30 tokens: 30 one-word events, then why
    bob = events("bob")  # no budget: every word
    assert [data.strip() for kind, data in alice if kind == "message"] == ANSWER.split()[:30]
    assert alice[-1][0] == "error" and "budget" in alice[-1][1]
    assert [data.strip() for _, data in bob] == ANSWER.split()
    rows = {row["key"]: row for row in served.bill()["clients"]}
    assert rows["alice"]["reason"] == "budget_exhausted" and rows["alice"]["tokens"] == 30
    assert rows["bob"]["reason"] == "complete" and rows["bob"]["tokens"] == WORDS
