"""Errors in each API's own shape, both ways (pure).

`error_body()` writes an error the way the API a request was for writes one, so the client's
SDK can read the message and say why (OpenAI `{"error": {"message", "type", "code"}}`,
Anthropic `{"type": "error", "error": {"type", "message"}}`); `error_detail()` reads the
message back out of an upstream's error body.
"""

from __future__ import annotations

import json
from typing import Any

#: The APIs whose error shapes are known (the mock's providers, and what a proxy fronts).
APIS = ("openai", "openai-responses", "anthropic", "ollama", "gemini")

# google.rpc.Code names, as Gemini's errors carry them.
_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def api_of_path(path: str) -> str:
    """Which API a request path is for, by the shape of its path: Anthropic's `/messages`,
    Ollama's `/api/...`, Gemini's `models/M:generateContent`; anything else is spoken to
    in OpenAI's shape, which most gateways and SDKs read."""
    if path.endswith(("/messages", "/messages/count_tokens")):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if ":generateContent" in path or ":streamGenerateContent" in path or "/v1beta/" in path:
        return "gemini"
    return "openai"


def error_kind(api: str, status: int) -> str:
    """The `type` an API gives an error of this HTTP status."""
    if api == "anthropic":
        return {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            503: "overloaded_error",
        }.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
    }.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(
    api: str,
    message: str,
    kind: str | None = None,
    *,
    status: int = 400,
    code: str | None = None,
) -> dict[str, Any]:
    """An error answer in the shape `api`'s SDK reads the message from. `kind` is the
    error's `type` (by default the API's own for `status`); `code` a machine-readable
    reason (e.g. `budget_exhausted`) where the shape has room for one."""
    kind = kind or error_kind(api, status)
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    if api == "ollama":
        return {"error": message}
    if api == "gemini":
        return {
            "error": {
                "code": status,
                "message": message,
                "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
            }
        }
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_detail(body: str) -> str:
    """A short reason from an error body: its JSON error message, else its first line."""
    text = body.strip()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        error = obj.get("error")
        for candidate in (
            error.get("message") if isinstance(error, dict) else error,
            obj.get("message"),
            obj.get("detail"),
        ):
            if isinstance(candidate, str) and candidate.strip():
                text = candidate
                break
    line = " ".join(text.split())
    return line if len(line) <= 160 else line[:157] + "..."


def stream_error_event(api: str | None, message: str, code: str, *, sse: bool = True) -> bytes:
    """The last event of a stream that sserelay cuts (a spent budget), in the streaming shape
    of `api` so that its SDK raises an error that says why: OpenAI and Gemini a `data:`
    error object (`code` in it), the Responses API and Anthropic an `event: error`, Ollama's
    NDJSON an error line; the bare stream (`api` None) an `event: error` with the text."""
    if not sse:
        if api == "ollama":
            return (json.dumps({"error": message}) + "\n").encode()
        return f"sserelay: {message}\n".encode()
    if api is None:
        return f"event: error\ndata: sserelay: {message}\n\n".encode()
    if api == "anthropic":
        body = {"type": "error", "error": {"type": code, "message": message}}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    body = error_body(api, message, code, status=429, code=code)
    event = "event: error\n" if api == "openai-responses" else ""
    return f"{event}data: {json.dumps(body)}\n\n".encode()
