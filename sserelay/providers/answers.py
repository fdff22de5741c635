"""What the providers' APIs say, for the mock LLM endpoint (`sserelay serve --as`): pure.

`read_request()` takes what the mock needs from a request body (model, stream,
include_usage, the prompt's texts); an `Answer` builds the reply, sans-IO, the way
the provider's own API streams it:

- `openai`: Chat Completions. `chat.completion.chunk` objects (role first, one per
  text chunk, then `finish_reason`, then the usage chunk if asked for) and `[DONE]`.
- `anthropic`: Messages. `message_start`, `content_block_start`, `ping`, one
  `content_block_delta` (text_delta) per chunk, `content_block_stop`,
  `message_delta` (stop reason, usage), `message_stop`; every event named.
- `openai-responses`: Responses. `response.created` ... `response.output_text.delta`
  per chunk ... `response.completed` (with usage); every event named and numbered.

Every payload is one line of JSON: a text holding line ends or quotes is escaped by
JSON, never split into SSE lines, so an SDK gets the exact text back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sserelay.providers.openai_chunks import openai_chunk, openai_usage_chunk
from sserelay.wire.sse import Event

#: The names `--as` accepts.
PROVIDERS = ("openai", "anthropic", "openai-responses")
#: The model named when a request names none (and the one `/v1/models` lists).
DEFAULT_MODEL = "sserelay-mock"


@dataclass(frozen=True, slots=True)
class MockRequest:
    """What the mock reads from a request. `prompt` holds the texts of the
    messages (and system prompt or instructions), to count its tokens."""

    model: str
    stream: bool
    include_usage: bool
    prompt: tuple[str, ...]


def _json(obj: object) -> str:
    # Compact, like the providers; ensure_ascii off: a text's line ends are still escaped.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _texts(content: object, kinds: tuple[str, ...]) -> Iterator[str]:
    """The texts of a message's content: a string, or a list of typed parts."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if (
                isinstance(part, dict)
                and part.get("type") in kinds
                and isinstance(part.get("text"), str)
            ):
                yield part["text"]


def _messages(request: dict[str, Any], key: str) -> list[dict[str, Any]]:
    messages = request.get(key)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"'{key}' must be a list of message objects")
    return messages


def read_request(provider: str, body: bytes) -> MockRequest:
    """The fields of a completion request for `provider`; ValueError with a one-line
    reason (for the 400 answer) if the body is not JSON or lacks its messages."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise ValueError("the request body must be a JSON object")
    model = request.get("model")
    model = model if isinstance(model, str) and model else DEFAULT_MODEL
    prompt: list[str] = []
    if provider == "openai":
        for message in _messages(request, "messages"):
            prompt += _texts(message.get("content"), ("text",))
    elif provider == "anthropic":
        prompt += _texts(request.get("system"), ("text",))
        for message in _messages(request, "messages"):
            prompt += _texts(message.get("content"), ("text",))
    elif provider == "openai-responses":
        prompt += _texts(request.get("instructions"), ())
        items = request.get("input")
        if isinstance(items, str):
            prompt.append(items)
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    prompt += _texts(item.get("content"), ("input_text", "output_text"))
        else:
            raise ValueError("'input' must be a string or a list of input items")
    else:
        raise ValueError(f"unknown provider {provider!r}")
    options = request.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return MockRequest(model, request.get("stream") is True, include_usage, tuple(prompt))


class Answer(Protocol):
    """One reply, streamed (`start`, `text` per chunk, `end`) or whole."""

    def start(self) -> list[Event]:
        """The events that open the stream, before any text."""
        ...

    def text(self, chunk: str) -> list[Event]:
        """The event that carries `chunk` (none for an empty chunk)."""
        ...

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[Event]:
        """The events that close the stream, with the usage."""
        ...

    def whole(self, text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The non-streaming answer."""
        ...


class ChatCompletionAnswer:
    """OpenAI Chat Completions (`POST /v1/chat/completions`)."""

    def __init__(self, id: str, model: str, created: int, *, include_usage: bool = False) -> None:
        self.id = id
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def _event(self, chunk: dict[str, Any]) -> Event:
        if self.include_usage:  # the API then says `usage: null` on every other chunk
            chunk["usage"] = None
        return Event(_json(chunk))

    def start(self) -> list[Event]:
        chunk = openai_chunk(self.id, self.model, self.created, role="assistant", content="")
        return [self._event(chunk)]

    def text(self, chunk: str) -> list[Event]:
        if not chunk:
            return []
        return [self._event(openai_chunk(self.id, self.model, self.created, content=chunk))]

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[Event]:
        last = self._event(openai_chunk(self.id, self.model, self.created, finish_reason="stop"))
        events = [last]
        if self.include_usage:
            usage = openai_usage_chunk(
                self.id, self.model, self.created, prompt_tokens, completion_tokens
            )
            events.append(Event(_json(usage)))
        events.append(Event("[DONE]"))
        return events

    def whole(self, text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


class MessagesAnswer:
    """Anthropic Messages (`POST /v1/messages`). The SDK skips unnamed events, so
    each event is named after its `type`."""

    def __init__(self, id: str, model: str) -> None:
        self.id = id
        self.model = model

    @staticmethod
    def _event(payload: dict[str, Any]) -> Event:
        return Event(_json(payload), event=payload["type"])

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }

    def start(self) -> list[Event]:
        # The prompt's tokens are known only at the end; message_start says 0 for both,
        # and message_delta carries the real counts (the SDK keeps the later ones).
        message = {**self._message([], None), "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [
            self._event({"type": "message_start", "message": message}),
            self._event(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
            ),
            self._event({"type": "ping"}),
        ]

    def text(self, chunk: str) -> list[Event]:
        if not chunk:
            return []
        delta = {"type": "text_delta", "text": chunk}
        return [self._event({"type": "content_block_delta", "index": 0, "delta": delta})]

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[Event]:
        return [
            self._event({"type": "content_block_stop", "index": 0}),
            self._event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
                }
            ),
            self._event({"type": "message_stop"}),
        ]

    def whole(self, text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        usage = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
        return {**self._message([{"type": "text", "text": text}], "end_turn"), "usage": usage}


class ResponsesAnswer:
    """OpenAI Responses (`POST /v1/responses`): one message with one output_text part.
    Every event is named after its `type` and carries a `sequence_number`."""

    def __init__(self, id: str, model: str, created: int) -> None:
        self.id = id
        self.item_id = "msg_" + id.removeprefix("resp_")
        self.model = model
        self.created = created
        self._sequence = 0
        self._text: list[str] = []

    def _event(self, kind: str, **fields: Any) -> Event:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return Event(_json(payload), event=kind)

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "usage": usage,
            "metadata": {},
        }

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def start(self) -> list[Event]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", response=self._response("in_progress", [], None)),
            self._event("response.in_progress", response=self._response("in_progress", [], None)),
            self._event(
                "response.output_item.added", output_index=0, item=self._item("in_progress", [])
            ),
            self._event("response.content_part.added", **where, part=self._part("")),
        ]

    def text(self, chunk: str) -> list[Event]:
        if not chunk:
            return []
        self._text.append(chunk)
        return [
            self._event(
                "response.output_text.delta",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                delta=chunk,
                logprobs=[],
            )
        ]

    def end(self, prompt_tokens: int, completion_tokens: int) -> list[Event]:
        text = "".join(self._text)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        item = self._item("completed", [self._part(text)])
        usage = self._usage(prompt_tokens, completion_tokens)
        return [
            self._event("response.output_text.done", **where, text=text, logprobs=[]),
            self._event("response.content_part.done", **where, part=self._part(text)),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event("response.completed", response=self._response("completed", [item], usage)),
        ]

    def whole(self, text: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        item = self._item("completed", [self._part(text)])
        return self._response("completed", [item], self._usage(prompt_tokens, completion_tokens))


def new_answer(provider: str, request: MockRequest, token: str, created: int) -> Answer:
    """The answer to `request`; `token` makes its ids unique, `created` is Unix time."""
    if provider == "openai":
        return ChatCompletionAnswer(
            f"chatcmpl-{token}", request.model, created, include_usage=request.include_usage
        )
    if provider == "anthropic":
        return MessagesAnswer(f"msg_{token}", request.model)
    if provider == "openai-responses":
        return ResponsesAnswer(f"resp_{token}", request.model, created)
    raise ValueError(f"unknown provider {provider!r}")


def models_list(provider: str, model: str = DEFAULT_MODEL, created: int = 0) -> dict[str, Any]:
    """`GET /v1/models`: the one model the mock serves."""
    if provider == "anthropic":
        return {
            "data": [
                {
                    "type": "model",
                    "id": model,
                    "display_name": model,
                    "created_at": "1970-01-01T00:00:00Z",
                }
            ],
            "has_more": False,
            "first_id": model,
            "last_id": model,
        }
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "sserelay"}],
    }


def encode_json(obj: object) -> bytes:
    """A whole answer's body."""
    return _json(obj).encode()
