"""Real tokens and a true cost (issue 12), end to end: the real CLI, the real openai SDK.

The bill's tokens are OpenAI's BPE count of the text a client was sent, however it was
split into events; a request's cost is its upstream's reported usage at the listed prices;
an answer without model text (a model list) bills 0 tokens.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sserelay.metering.bpe import load_encoding
from sserelay.wire.sse import SSEDecoder
from tests.conftest import Relay, wait_until

#: The proxy's and the mock's own default: auto (the tests' session says whitespace).
AUTO = {"SSERELAY_TOKENIZER": ""}
TEXT = (
    "Tokenizers split text into pieces: words, sub-words, punctuation, and   spaces.\n"
    "Ünïcödé, 日本語のテキスト, emoji 🎉🎉, numbers 12345678 and contractions don't count "
    "alike.\n" * 3
)


@pytest.fixture
def answer(tmp_path: Path) -> Path:
    path = tmp_path / "answer.txt"
    path.write_text(TEXT)
    return path


def o200k(text: str) -> int:
    return load_encoding("o200k_base").count(text)


def test_the_sdk_text_is_billed_as_its_o200k_count_and_priced_from_reported_usage(
    relay: Any, answer: Path, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('["gpt-4o-mini"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n')
    mock: Relay = relay(
        "serve", str(answer), "--as", "openai", "--chunk", "word", "--no-ledger", "--quiet",
        env=AUTO,
    )  # fmt: skip
    proxy: Relay = relay(
        "proxy", "--upstream", mock.url + "v1", "--prices", str(prices), "--no-ledger", "--json",
        env=AUTO,
    )  # fmt: skip
    client = openai.OpenAI(base_url=proxy.url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say it."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    client.close()
    assert usage is not None
    wait_until(lambda: " · complete" in proxy.stderr)
    proxy.signal(signal.SIGINT)
    bill = proxy.bill()
    row = bill["clients"][0]
    assert text == TEXT.rstrip()  # --chunk word sends no whitespace after the last word
    assert row["tokens"] == o200k(text) == usage.completion_tokens
    assert (row["tokenizer"], row["estimate"]) == ("o200k_base", False)
    assert row["usage_source"] == "reported"
    by_hand = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert row["cost"] == pytest.approx(by_hand)
    assert bill["cost"] == pytest.approx(by_hand)


def test_a_client_that_leaves_is_billed_the_bpe_count_of_what_it_was_sent(
    relay: Any, answer: Path
) -> None:
    mock: Relay = relay(
        "serve", str(answer), "--as", "openai", "--chunk", "word", "--rate", "200", "--json",
        "--no-ledger", env=AUTO,
    )  # fmt: skip
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    decoder = SSEDecoder()
    sent = ""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", mock.url + "v1/chat/completions", json=body) as response,
    ):
        chunks = response.iter_raw()
        for raw in chunks:
            for event in decoder.decode(raw):
                if event.data != "[DONE]":
                    for choice in json.loads(event.data)["choices"]:
                        sent += choice["delta"].get("content") or ""
            if len(sent) > len(TEXT) // 3:
                break
    wait_until(lambda: "client_disconnected" in mock.stderr)
    mock.signal(signal.SIGTERM)
    row = mock.bill()["clients"][0]
    assert row["reason"] == "client_disconnected"
    # Exactly what it was sent, counted as one text (not delta by delta): at most the one
    # event that was written but had not yet arrived when the client left.
    assert o200k(sent) <= row["tokens"] <= o200k(sent) + 3


def test_serve_words_with_a_bpe_count_bills_the_whole_text(relay: Any, answer: Path) -> None:
    running: Relay = relay(
        "serve", str(answer), "--chunk", "word", "--tokenizer", "o200k_base", "--json"
    )
    events = SSEDecoder().decode(httpx.get(running.url, timeout=10).content)
    bill = running.bill()
    words = [event.data for event in events]
    assert bill["tokens"] == o200k("".join(words))
    assert bill["tokens"] < sum(o200k(word) for word in words)  # per delta would over-count


def test_a_model_list_carries_no_model_text_and_bills_no_tokens(relay: Any, answer: Path) -> None:
    mock: Relay = relay("serve", str(answer), "--as", "openai", "--no-ledger", "--quiet")
    proxy: Relay = relay(
        "proxy", "--upstream", mock.url + "v1", "--no-ledger", "--once", "--json", env=AUTO
    )
    listing = httpx.get(proxy.url + "models", timeout=10)
    assert listing.status_code == 200 and listing.json()["data"]
    bill = proxy.bill()
    assert bill["tokens"] == 0 and bill["bytes"] == len(listing.content)


def test_tokenizers_lists_what_is_available(relay: Any) -> None:
    import subprocess
    import sys

    listing = subprocess.run(
        [sys.executable, "-m", "sserelay", "tokenizers"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    names = [line.split()[0] for line in listing.splitlines()]
    assert names == ["auto", "chars", "cl100k_base", "o200k_base", "whitespace"]
