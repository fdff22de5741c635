"""Provider payloads: the text a model's stream delivers, and the usage the upstream reports.

A metering proxy sees JSON envelopes; the bill counts the text inside them. One payload is one
SSE event's data (with its `event:` name, if any) or one NDJSON line. Formats known here:

- ``openai``: Chat Completions chunks (and legacy Completions), ended by ``data: [DONE]``.
  https://platform.openai.com/docs/api-reference/chat-streaming
- ``responses``: OpenAI Responses API semantic events.
  https://platform.openai.com/docs/api-reference/responses-streaming
- ``anthropic``: Anthropic Messages events.
  https://docs.anthropic.com/en/docs/build-with-claude/streaming
- ``ollama``: Ollama NDJSON lines from ``/api/chat`` and ``/api/generate``.
  https://github.com/ollama/ollama/blob/main/docs/api.md
- ``gemini``: Gemini ``streamGenerateContent?alt=sse``.
  https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent
- ``raw``: the data is the text.

Pure: no I/O, and nothing an upstream sends makes a function here raise.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sserelay.metering.usage import Usage

from .reported import anthropic_usage, openai_usage, responses_usage, usage_from

PAYLOAD_KINDS: tuple[str, ...] = (
    "auto",
    "openai",
    "responses",
    "anthropic",
    "ollama",
    "gemini",
    "raw",
)

# OpenAI's end-of-stream sentinel: `data: [DONE]`, the one payload that is not JSON.
_DONE = "[DONE]"


@dataclass(frozen=True, slots=True, init=False)
class Delta:
    """What one payload carries. `text` reaches the user; a model's text may stop mid-word, so
    meter it over the joined text (`metering.tokens.TokenCounter`). A 'raw' payload is whatever
    its sender made it (`sserelay serve` sends whole chunks, counted one by one). `usage` is
    the report in this payload, None when it has none; `done` marks a terminal payload."""

    text: str = ""
    usage: Usage | None = None
    model: str | None = None
    done: bool = False

    def __init__(
        self,
        text: str = "",
        usage: Usage | None = None,
        model: str | None = None,
        done: bool = False,
    ) -> None:
        # As Frames: the slots set through their descriptors, 1.3 -> 0.8 us per Delta (one
        # per relayed event; issue 17). Still frozen.
        _set_text(self, text)
        _set_usage(self, usage)
        _set_model(self, model)
        _set_done(self, done)


_set_text = vars(Delta)["text"].__set__
_set_usage = vars(Delta)["usage"].__set__
_set_model = vars(Delta)["model"].__set__
_set_done = vars(Delta)["done"].__set__

_NOTHING = Delta()
_NOT_JSON = object()


#: orjson's parser, where installed (`pip install 'sserelay[fast]'`): the same values, in C.
_fast_loads: Callable[[bytes], Any] | None = None
_FastJSONError: type[ValueError] = ValueError
with contextlib.suppress(ImportError):
    import orjson

    _fast_loads = orjson.loads
    _FastJSONError = orjson.JSONDecodeError

#: orjson reads an integer past 64 bits as a float, where json keeps it exact: a payload
#: with a run of 19 digits (a string's, perhaps) is read by json. Digits become zeros here.
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def _load(data: str) -> object:
    """The JSON value of `data` as `json.loads` reads it, or `_NOT_JSON`."""
    if _fast_loads is not None:
        # Measured on the capacity bench's chunks: 4.5 -> 1.8 us per payload, this check
        # included (issue 17). What orjson refuses and json takes (NaN, 1e400, a lone
        # surrogate, deep nesting) goes to json below, so the value is always json's.
        raw = data.encode("utf-8", "surrogatepass")
        if _LONG_NUMBER not in raw.translate(_DIGITS_TO_ZERO):
            try:
                return _fast_loads(raw)
            except _FastJSONError:
                pass
    # ValueError covers JSONDecodeError and ints over 4,300 digits; deep nesting overflows.
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _is_done(data: str) -> bool:
    return data == _DONE or data.strip() == _DONE


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _model(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _dicts(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _type(obj: dict[str, Any], event: str | None) -> str:
    """The payload's `type`, else its SSE event name (both providers send both, equal)."""
    kind = obj.get("type")
    if isinstance(kind, str):
        return kind
    return event or ""


# --------------------------------------------------------------------------- per provider


def _openai(obj: dict[str, Any], event: str | None) -> Delta:
    # n > 1 interleaves choices; their text is joined in the order received.
    parts: list[str] = []
    choices = obj.get("choices")
    # The per-event path of an OpenAI stream: no list of the choices is built, and a null
    # usage is not looked into (-0.5 us per event; issue 17).
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                # content is null on role-only and tool_calls chunks; a refusal is shown instead.
                parts.append(_str(delta.get("content")))
                parts.append(_str(delta.get("refusal")))
            else:
                parts.append(_str(choice.get("text")))  # legacy Completions: `text_completion`
    # With stream_options.include_usage every chunk has `usage: null` except the last one,
    # whose `choices` is empty.
    report = obj.get("usage")
    usage = None if report is None else openai_usage(report)
    return Delta("".join(parts), usage, _model(obj.get("model")))


_RESPONSES_TEXT = frozenset({"response.output_text.delta", "response.refusal.delta"})
# The stream ends with exactly one of these; there is no `[DONE]`.
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _responses(obj: dict[str, Any], event: str | None) -> Delta:
    kind = _type(obj, event)
    if kind in _RESPONSES_TEXT:
        # `*.done` events and `response.completed` repeat the full text: counted once, here.
        # Reasoning summaries and function-call arguments are not text for the user.
        return Delta(text=_str(obj.get("delta")))
    response = obj.get("response")
    if not isinstance(response, dict):
        return _NOTHING
    usage = responses_usage(response.get("usage"))
    return Delta("", usage, _model(response.get("model")), kind in _RESPONSES_END)


def _anthropic(obj: dict[str, Any], event: str | None) -> Delta:
    kind = _type(obj, event)
    if kind == "content_block_delta":
        delta = obj.get("delta")
        # Only text_delta is the answer. thinking_delta is the model's reasoning (billed by
        # Anthropic as output tokens but not text the user reads), input_json_delta a tool
        # call's arguments, signature_delta a checksum: none is metered as text.
        if isinstance(delta, dict) and delta.get("type") == "text_delta":
            return Delta(text=_str(delta.get("text")))
        return _NOTHING
    if kind == "message_delta":
        # Cumulative counts: output_tokens always, input_tokens only from some relays.
        return Delta(usage=anthropic_usage(obj.get("usage")))
    if kind == "message_start":
        message = obj.get("message")
        if not isinstance(message, dict):
            return _NOTHING
        # output_tokens here is a placeholder (1 or so) that the message_delta supersedes.
        usage = anthropic_usage(message.get("usage"))
        return Delta("", usage, _model(message.get("model")))
    if kind == "content_block_start":
        block = obj.get("content_block")
        if isinstance(block, dict) and block.get("type") == "text":
            return Delta(text=_str(block.get("text")))  # "" in practice; deltas follow
        return _NOTHING
    if kind == "message_stop":
        return Delta(done=True)
    return _NOTHING  # ping, content_block_stop, error: nothing for the user or the bill


def _ollama(obj: dict[str, Any], event: str | None) -> Delta:
    message = obj.get("message")
    # /api/chat: message.content; /api/generate: response. `thinking` is reasoning, not text.
    text = _str(message.get("content")) if isinstance(message, dict) else _str(obj.get("response"))
    # The counts come on the last line only (done: true); prompt_eval_count may be missing
    # when the prompt was cached, which is "not reported", not 0.
    usage = usage_from(obj, "prompt_eval_count", "eval_count")
    return Delta(text, usage, _model(obj.get("model")), obj.get("done") is True)


def _gemini(obj: dict[str, Any], event: str | None) -> Delta:
    parts: list[str] = []
    candidates = _dicts(obj.get("candidates"))
    for candidate in candidates:
        content = candidate.get("content")
        if not isinstance(content, dict):
            continue
        for part in _dicts(content.get("parts")):
            if part.get("thought") is not True:  # thought summaries are reasoning, not text
                parts.append(_str(part.get("text")))
    # usageMetadata rides on every chunk as running totals; candidatesTokenCount excludes
    # thoughtsTokenCount, totalTokenCount includes it.
    usage = usage_from(
        obj.get("usageMetadata"),
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        cached=("cachedContentTokenCount",),
        reasoning=("thoughtsTokenCount",),
    )
    # No end marker: the chunk whose candidates all carry a finishReason is the last.
    done = bool(candidates) and all(isinstance(c.get("finishReason"), str) for c in candidates)
    return Delta("".join(parts), usage, _model(obj.get("modelVersion")), done)


_PARSERS: dict[str, Callable[[dict[str, Any], str | None], Delta]] = {
    "openai": _openai,
    "responses": _responses,
    "anthropic": _anthropic,
    "ollama": _ollama,
    "gemini": _gemini,
}

_ANTHROPIC_TYPES = frozenset(
    {
        "message_start",
        "message_delta",
        "message_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "ping",
    }
)


def _detect(obj: object, event: str | None) -> str:
    if not isinstance(obj, dict):
        return "raw"
    kind = _type(obj, event)
    if kind.startswith("response."):
        return "responses"
    if kind in _ANTHROPIC_TYPES:
        return "anthropic"
    if kind == "error":
        # Both name it `error`: Anthropic nests an error object, Responses spreads its fields.
        return "anthropic" if isinstance(obj.get("error"), dict) else "responses"
    # By shape, not `object`: Azure OpenAI's first chunk has `object: ""` and empty choices.
    if isinstance(obj.get("choices"), list):
        return "openai"
    if isinstance(obj.get("candidates"), list) or isinstance(obj.get("usageMetadata"), dict):
        return "gemini"
    if isinstance(obj.get("done"), bool) and ("message" in obj or "response" in obj):
        return "ollama"
    return "raw"


def detect_kind(data: str, event: str | None = None) -> str:
    """Which provider format one payload is in: 'openai', 'responses', 'anthropic', 'ollama',
    'gemini', or 'raw' when it is not JSON of a known shape.

    `[DONE]` and blank data identify nothing and give 'raw'; `PayloadMeter` does not let them
    decide a stream's kind."""
    return _detect(_load(data), event)


def _parse(kind: str, data: str, event: str | None) -> Delta:
    obj = _load(data)
    if obj is _NOT_JSON:
        return Delta(done=True) if _is_done(data) else _NOTHING
    if not isinstance(obj, dict):
        return _NOTHING
    return _PARSERS[kind](obj, event)


def parse_payload(kind: str, data: str, event: str | None = None) -> Delta:
    """What one payload carries, read as `kind` (one of `PAYLOAD_KINDS`).

    Never raises on malformed input: non-JSON or unexpected shapes give `Delta(text=data)`
    for 'raw' and `Delta()` for the JSON kinds (nothing billable). `[DONE]` is
    `Delta(done=True)` for every JSON kind. 'auto' detects this payload alone; use
    `PayloadMeter` for a stream. An unknown `kind` is a ValueError."""
    if kind == "raw":
        return Delta(text=data)
    if kind == "auto":
        obj = _load(data)
        if obj is _NOT_JSON:
            return Delta(done=True) if _is_done(data) else Delta(text=data)
        found = _detect(obj, event)
        if found == "raw" or not isinstance(obj, dict):
            return Delta(text=data)
        return _PARSERS[found](obj, event)
    if kind not in _PARSERS:
        raise ValueError(f"unknown payload kind {kind!r} (known: {', '.join(PAYLOAD_KINDS)})")
    return _parse(kind, data, event)


class PayloadMeter:
    """Per-request state: give it each payload (SSE data and event name, or an NDJSON line)
    in order; `feed` returns what that payload carries.

    kind='auto' detects on the first payload that identifies a format and sticks to it:
    a provider's JSON shape, or plain text (then 'raw'). Until then, `[DONE]` and blank data
    decide nothing, and a JSON object of no known shape (an error, a model list) carries no
    text and decides nothing. In auto mode `[DONE]` is always the end, with no text, even once the
    stream turned out 'raw'.

    `usage` is the upstream's report so far, merged by `Usage.merged`; None if it never
    reported. `model` is the last model named; `done` whether a terminal payload was seen."""

    def __init__(self, kind: str = "auto") -> None:
        if kind not in PAYLOAD_KINDS:
            raise ValueError(f"unknown payload kind {kind!r} (known: {', '.join(PAYLOAD_KINDS)})")
        self.kind = kind
        self._auto = kind == "auto"
        self.usage: Usage | None = None
        self.model: str | None = None
        self.done = False

    def feed(self, data: str, event: str | None = None) -> Delta:
        kind = self.kind
        if kind == "auto":
            delta = self._feed_auto(data, event)
        elif kind == "raw":
            delta = Delta(done=True) if self._auto and _is_done(data) else Delta(text=data)
        else:
            delta = _parse(kind, data, event)
        if delta.usage is not None:
            self.usage = delta.usage if self.usage is None else self.usage.merged(delta.usage)
        if delta.model is not None:
            self.model = delta.model
        if delta.done:
            self.done = True
        return delta

    def _feed_auto(self, data: str, event: str | None) -> Delta:
        obj = _load(data)
        if obj is _NOT_JSON:
            if _is_done(data):
                return Delta(done=True)
            if not data.strip():  # a blank NDJSON line or an empty event
                return _NOTHING
            self.kind = "raw"
            return Delta(text=data)
        found = _detect(obj, event)
        if not isinstance(obj, dict):
            return Delta(text=data)
        if found == "raw":
            # A JSON object of no provider's shape (an error, a model list, a tool's own
            # status) carries no model text: relayed, not metered, and it decides nothing.
            return _NOTHING
        self.kind = found
        return _PARSERS[found](obj, event)


def _texts(items: object, kind: str) -> list[str]:
    """The `text` of each part of `items` whose type is `kind`."""
    return [_str(item.get("text")) for item in _dicts(items) if item.get("type") == kind]


def whole_answer(answer: dict[str, Any]) -> Delta | None:
    """The text, usage and model of a non-streaming answer of OpenAI Chat Completions
    (`choices[].message`), OpenAI Responses (`object: response`) or Anthropic Messages
    (`type: message`); None for any other shape (Ollama's and Gemini's whole answers have
    the shape of their stream payloads: read them with `PayloadMeter`)."""
    model = _model(answer.get("model"))
    choices = _dicts(answer.get("choices"))
    messages = [c["message"] for c in choices if isinstance(c.get("message"), dict)]
    if messages:
        text = "".join(_str(message.get("content")) for message in messages)
        return Delta(text, openai_usage(answer.get("usage")), model)
    if answer.get("object") == "response":
        parts: list[str] = []
        for output in _dicts(answer.get("output")):
            if output.get("type") == "message":
                parts += _texts(output.get("content"), "output_text")
        return Delta("".join(parts), responses_usage(answer.get("usage")), model)
    if answer.get("type") == "message" and isinstance(answer.get("content"), list):
        text = "".join(_texts(answer.get("content"), "text"))
        return Delta(text, anthropic_usage(answer.get("usage")), model)
    return None


def is_usage_chunk(delta: Delta, data: str) -> bool:
    """Whether a payload is OpenAI's `include_usage` chunk: usage, and an empty `choices`."""
    if delta.usage is None or delta.text:
        return False
    obj = _load(data)
    return isinstance(obj, dict) and obj.get("choices") == []
