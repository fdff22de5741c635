"""What the proxy reads from and changes in a request, and reads from an error body (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sserelay.providers.errors import error_detail
from sserelay.providers.requests import ask_for_usage


def test_include_usage_is_added_to_a_streaming_chat_request() -> None:
    request = {"model": "m", "stream": True, "messages": [], "stream_options": {"x": 1}}
    assert ask_for_usage(request) == {
        **request,
        "stream_options": {"x": 1, "include_usage": True},
    }
    assert request["stream_options"] == {"x": 1}  # the client's request is not changed


@pytest.mark.parametrize(
    "request_body",
    [
        {"model": "m", "stream": False, "messages": []},  # not streaming: usage is in the body
        {"model": "m", "stream": True, "input": "hi"},  # not a chat request (Responses API)
        {"stream": True, "messages": [], "stream_options": {"include_usage": True}},  # asked
    ],
)
def test_include_usage_leaves_other_requests_alone(request_body: dict[str, Any]) -> None:
    assert ask_for_usage(request_body) is None


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (json.dumps({"error": {"message": "Rate limit reached"}}), "Rate limit reached"),
        (json.dumps({"error": "model not found"}), "model not found"),
        (json.dumps({"detail": "Not Found"}), "Not Found"),
        ("upstream exploded\nsecond line", "upstream exploded second line"),
        ("", ""),
        ("x" * 500, "x" * 157 + "..."),
    ],
)
def test_error_detail_is_one_short_line(body: str, detail: str) -> None:
    assert error_detail(body) == detail
