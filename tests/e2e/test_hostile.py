"""Nothing hostile gets in (issue 10): secrets never printed or recorded, numbers finite.

A credential can come back inside an upstream's error body; every configured secret (a
header's value, the token of `Bearer …`, URL userinfo and query secrets, the relay's own
auth token) is masked wherever sserelay prints or records text. Every number option is
finite: `nan` and `inf` are usage errors, and the bill is always valid JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import Relay

TOKEN = "sk-SECRET123-upstream-f00d"
USERINFO_PASSWORD = "pw-SECRET-77aa"
QUERY_KEY = "qk-SECRET-5150"
RELAY_TOKEN = "relay-SECRET-4242"
#: An upstream that is never called (the run stops at its options).
UNUSED = "http://127.0.0.1:9/"


def echo_secrets(request: Request) -> Response:
    """An upstream that refuses, quoting back every credential it was given."""
    body = {
        "error": {
            "message": (
                f"Incorrect API key provided: {TOKEN}. You sent "
                f"{request.headers.get('Authorization')} with {request.query_string.decode()} "
                f"and {USERINFO_PASSWORD}; the relay's token was {RELAY_TOKEN}"
            ),
            "type": "invalid_request_error",
        }
    }
    return Response(json.dumps(body), status=401, content_type="application/json")


def test_no_secret_reaches_stderr_the_bill_or_a_recording(
    relay: Any, upstream: HTTPServer, tmp_path: Path
) -> None:
    upstream.expect_request("/v1/chat/completions").respond_with_handler(echo_secrets)
    base = upstream.url_for("/v1").replace("http://", f"http://user:{USERINFO_PASSWORD}@")
    recording = tmp_path / "rec.jsonl"
    running: Relay = relay(
        "proxy",
        "--upstream",
        f"{base}?key={QUERY_KEY}",
        "--upstream-header",
        f"Authorization: Bearer {TOKEN}",
        "--auth-token",
        RELAY_TOKEN,
        "--record",
        str(recording),
        "--once",
        "--json",
    )
    response = httpx.post(
        running.url + "chat/completions",
        json={"model": "m", "messages": []},
        headers={"Authorization": f"Bearer {RELAY_TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 401
    bill = running.bill()
    assert bill["reason"] == "upstream_error"
    everything = running.stderr + json.dumps(bill) + recording.read_text()
    assert "Incorrect API key provided: ***" in running.stderr
    for secret in (TOKEN, USERINFO_PASSWORD, QUERY_KEY, RELAY_TOKEN):
        assert secret not in everything, secret
    # The relay's own client still got the upstream's answer as it was (its own key's
    # business), and the upstream never saw the relay's token.
    assert TOKEN in response.text
    assert RELAY_TOKEN not in str(upstream.log[0][0].headers)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["serve", "--price", "nan"], "--price"),
        (["serve", "--price", "inf"], "--price"),
        (["serve", "--price", "-inf"], "--price"),
        (["serve", "--price", "1e308"], "--price"),
        (["serve", "--heartbeat", "nan"], "--heartbeat"),
        (["serve", "--rate", "nan"], "--rate"),
        (["serve", "--delay", "nan"], "--delay"),
        (["serve", "--delay", "inf"], "--delay"),
        (["proxy", "--upstream", UNUSED, "--read-timeout", "nan"], "--read-timeout"),
        (["proxy", "--upstream", UNUSED, "--connect-timeout", "inf"], "--connect-timeout"),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_usage_errors(args: list[str], option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sserelay", *args, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert option in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_price_list_with_a_non_finite_price_is_refused(tmp_path: Path, value: str) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(f'["m"]\ninput = {value}\noutput = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "sserelay", "proxy", "--upstream", UNUSED, "--prices", str(prices)],
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "--prices" in result.stderr and "input" in result.stderr


def test_the_bill_is_always_strict_json(relay: Any, tmp_path: Path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("one two three\n")
    running: Relay = relay("serve", str(source), "--price", "1e200", "--json")
    httpx.get(running.url, timeout=10)

    def refuse(constant: str) -> float:
        raise AssertionError(f"not JSON: {constant}")

    bill = json.loads(running.stdout() if running.wait(10) == 0 else "", parse_constant=refuse)
    assert bill["cost"] == pytest.approx(3e200 / 1e6)
