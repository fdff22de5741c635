"""What a new user trips on (issue 18): resume after a blip, errors an SDK can read, hints.

A client that loses its connection comes back with Last-Event-ID within `--linger` and gets
the rest; one that comes when the stream can no longer be served gets 204 (an EventSource
then stops); the first event carries `retry:`. A doubled `/v1` prefix is named; a bare
`host:port` upstream is taken as curl takes it; a typo'd path lists the routes; a proxied
answer has one `date` header.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import openai
import pytest
from pytest_httpserver import HTTPServer

from sserelay import SSEDecoder
from tests.conftest import Relay


def test_a_resume_within_the_linger_gets_the_rest_and_a_late_one_gets_204(relay: Any) -> None:
    running: Relay = relay("serve", "--json", "--linger", "3")
    running.feed("one\ntwo\n")
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", running.url) as first:
            decoder = SSEDecoder()
            events = []
            for chunk in first.iter_raw():
                events += decoder.decode(chunk)
                if len(events) == 2:
                    break
        assert events[0].retry == 1000  # a browser comes back within a second
        assert running.proc.poll() is None  # the only client left: the stream lingers
        running.feed("three\n")
        running.stdin.close()
        resumed = client.get(running.url, headers={"Last-Event-ID": events[-1].id or ""})
        assert [e.data for e in SSEDecoder().decode(resumed.content)] == ["three"]
        bill = running.bill()
    assert bill["reason"] == "complete"
    assert [c["tokens"] for c in bill["clients"]] == [2, 1]


def test_a_request_that_can_no_longer_be_served_gets_204(relay: Any) -> None:
    running: Relay = relay("serve", "--json", "--linger", "0.2", "--keep")
    running.feed("one\n")
    running.stdin.close()
    with httpx.Client(timeout=10) as client:
        assert "one" in client.get(running.url).text
        # Everything was sent: a resume from the last id is told there is nothing more.
        assert client.get(running.url, headers={"Last-Event-ID": "1"}).status_code == 204
    running.signal(signal.SIGTERM)
    running.bill()


def test_without_linger_the_run_ends_when_its_client_leaves(relay: Any) -> None:
    running: Relay = relay("serve", "--json", "--linger", "0")
    running.feed("one\n")
    with httpx.Client(timeout=10) as client, client.stream("GET", running.url) as response:
        next(response.iter_raw())
    assert running.wait(10) == 3


def test_a_doubled_v1_prefix_is_named_in_the_error_and_the_receipt(
    relay: Any, upstream: HTTPServer
) -> None:
    upstream.expect_request("/v1/v1/chat/completions").respond_with_data("nope", status=404)
    proxy: Relay = relay("proxy", "--upstream", upstream.url_for("/v1"), "--once", "--json")
    client = openai.OpenAI(base_url=proxy.url + "v1", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "starts with /v1 again" in raised.value.message
    bill = proxy.bill()
    assert bill["reason"] == "upstream_error"
    assert "/v1/v1/chat/completions" in proxy.stderr and "starts with /v1 again" in proxy.stderr


def test_a_bare_host_and_port_upstream_is_http(relay: Any, upstream: HTTPServer) -> None:
    upstream.expect_request("/x").respond_with_data("hello")
    bare = upstream.url_for("/").removeprefix("http://").rstrip("/")
    proxy: Relay = relay("proxy", "--upstream", bare, "--once", "--json")
    answer = httpx.get(proxy.url + "x", timeout=10)
    assert answer.text == "hello"
    assert answer.headers.get_list("date") and len(answer.headers.get_list("date")) == 1
    proxy.bill()


def test_a_typo_d_path_lists_the_routes(relay: Any) -> None:
    running: Relay = relay("serve", "--json")
    answer = httpx.get(running.url + "event", timeout=10)
    assert answer.status_code == 404
    assert "/events" in answer.text and "/healthz" in answer.text
    running.stdin.close()
    running.signal(signal.SIGTERM)
    running.bill()


def test_a_bad_value_from_the_environment_names_the_variable(relay: Any) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sserelay", "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SSERELAY_PORT": "abc"},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "SSERELAY_PORT" in result.stderr


def test_help_mentions_the_environment() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sserelay", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "SSERELAY_PORT" in out and "SSERELAY_KEEP" in out


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_an_unreachable_upstream_is_an_error_the_sdk_can_read(relay: Any, sdk: str) -> None:
    proxy: Relay = relay("proxy", "--upstream", "http://127.0.0.1:9/", "--once", "--json")
    message: str
    if sdk == "openai":
        client = openai.OpenAI(base_url=proxy.url, api_key="k", max_retries=0)
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        message = raised.value.message
        assert raised.value.status_code == 502
    else:
        import anthropic

        other = anthropic.Anthropic(base_url=proxy.url.rstrip("/"), api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as failed:
            other.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        message = failed.value.message
        assert failed.value.status_code == 502
    assert "sserelay: upstream error" in message and "refused the connection" in message
    assert proxy.bill()["reason"] == "upstream_error"
