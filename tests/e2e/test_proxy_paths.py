"""`sserelay proxy` keeps every request under the upstream's base path (issue 10, item 5).

Requests go out on raw sockets, as sent: httpx (like browsers) would resolve the dot
segments itself before sending. The upstream is a real pytest-httpserver that records
the raw path it was asked for.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.conftest import Relay

SECRET = "sk-upstream-SECRET-paths"


def raw_get(relay: Relay, target: bytes) -> tuple[int, bytes]:
    """`GET target` sent byte for byte; the answer's status and body (connection: close)."""
    match = re.match(r"http://([^/:]+):(\d+)/", relay.url)
    assert match is not None
    with socket.create_connection((match.group(1), int(match.group(2))), timeout=10) as conn:
        conn.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def recording_upstream(upstream: HTTPServer) -> list[str]:
    """Make `upstream` answer `ok` to anything; the returned list gets each raw path asked for."""
    asked: list[str] = []

    def handler(request: Request) -> Response:
        asked.append(request.environ["RAW_URI"])
        return Response("ok", content_type="text/plain")

    upstream.expect_request(re.compile(".*")).respond_with_handler(handler)
    return asked


def start_proxy(relay: Any, upstream: HTTPServer) -> Relay:
    running: Relay = relay(
        "proxy",
        "--upstream",
        upstream.url_for("/v1"),
        "--upstream-header",
        f"Authorization: Bearer {SECRET}",
        "--json",
        "--quiet",
    )
    return running


def test_dot_segments_are_resolved_under_the_base_path(relay: Any, upstream: HTTPServer) -> None:
    asked = recording_upstream(upstream)
    running = start_proxy(relay, upstream)
    cases = {
        b"/chat/completions": "/v1/chat/completions",
        b"/chat/../completions": "/v1/completions",
        b"/chat/%2e%2E/models": "/v1/models",
        b"/chat/./x?a=1": "/v1/chat/x?a=1",
        b"/models/..": "/v1",  # `/`, which is the base URL itself
        b"/a%2Fb": "/v1/a%2Fb",
    }
    for target, path in cases.items():
        assert raw_get(running, target) == (200, b"ok"), target
        assert asked[-1] == path, target
    assert len(asked) == len(cases)


def test_a_path_that_leaves_the_base_path_is_refused_before_the_upstream(
    relay: Any, upstream: HTTPServer
) -> None:
    asked = recording_upstream(upstream)
    running = start_proxy(relay, upstream)
    for target in (
        b"/../../etc/passwd",
        b"/chat/../../admin",
        b"/%2e%2e/%2e%2e/etc/passwd",
        b"/%2E./admin",
        b"/..%2f..%2fadmin",
        b"/chat/..%5c..%5cadmin",
        b"/..;/admin",
    ):
        status, body = raw_get(running, target)
        assert status == 400, target
        # In the error shape of the API the path is for (OpenAI's), so an SDK says why.
        message = json.loads(body)["error"]["message"]
        assert message.startswith("sserelay: bad request: "), target
        assert "\n" not in message, target
    assert asked == []
    assert len(upstream.log) == 0
    # Refused requests are no rows of the bill.
    running.signal(signal.SIGINT)
    assert running.bill()["clients"] == []
