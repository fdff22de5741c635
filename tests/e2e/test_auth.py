"""`--auth-token` leaves no way around it (issue 10, the auth note): `HEAD` needs the token
as `GET` does, and credentials given twice are refused (400) rather than one of them taken.

httpx sends a list of header tuples as is, duplicates included.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Relay

TOKEN = "s3cret-token"
GOOD = ("Authorization", f"Bearer {TOKEN}")
WRONG = ("Authorization", "Bearer wrong")
TIMEOUT = httpx.Timeout(10.0)


def start(relay: Any, tmp_path: Path) -> Relay:
    source = tmp_path / "s.txt"
    source.write_text("one two\n")
    running: Relay = relay("serve", str(source), "--json", "--keep", "--auth-token", TOKEN)
    return running


def test_head_needs_the_token_like_get(relay: Any, tmp_path: Path) -> None:
    running = start(relay, tmp_path)
    with httpx.Client(timeout=TIMEOUT) as client:
        for path in ("", "events"):
            url = running.url + path
            refused = client.head(url)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert client.head(url, headers=[WRONG]).status_code == 401
            assert client.head(url + "?token=wrong").status_code == 401
            allowed = client.head(url, headers=[GOOD])
            assert allowed.status_code == 200
            assert allowed.headers["content-type"] == "text/event-stream"
            assert client.head(url, params={"token": TOKEN}).status_code == 200


def test_credentials_given_twice_are_a_bad_request(relay: Any, tmp_path: Path) -> None:
    running = start(relay, tmp_path)
    url = running.url
    with httpx.Client(timeout=TIMEOUT) as client:
        for headers in ([GOOD, WRONG], [WRONG, GOOD], [GOOD, GOOD]):
            for method in ("GET", "HEAD"):
                response = client.request(method, url, headers=headers)
                assert response.status_code == 400, (method, headers)
        twice = client.get(url + f"?token=wrong&token={TOKEN}")
        assert twice.status_code == 400
        assert twice.text == "sserelay: bad request: the request has 2 token parameters\n"
        assert client.get(url, headers=[GOOD]).status_code == 200  # once is fine
    running.signal(signal.SIGINT)
    bill = running.bill()
    assert [client["reason"] for client in bill["clients"]] == ["complete"]
