"""What a gateway reads from, or changes in, a client's request body (pure)."""

from __future__ import annotations

import json
from typing import Any


def read_json_request(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None for anything else (not JSON, not an object)."""
    try:
        request = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return None
    return request if isinstance(request, dict) else None


def requested_model(request: dict[str, Any] | None) -> str | None:
    """The `model` a request names, if it names one."""
    model = None if request is None else request.get("model")
    return model if isinstance(model, str) and model else None


def ask_for_usage(request: dict[str, Any]) -> dict[str, Any] | None:
    """`request` with `stream_options.include_usage` set, if it is a streaming
    OpenAI-style chat request that did not ask for usage itself; else None."""
    if request.get("stream") is not True or not isinstance(request.get("messages"), list):
        return None
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    options = dict(options) if isinstance(options, dict) else {}
    options["include_usage"] = True
    return {**request, "stream_options": options}
