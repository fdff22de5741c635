"""Tests for provider payload parsing, `sserelay.providers.payloads`.

The streams under `tests/payloads/` are wire bytes as each provider sends them, written from
the providers' public documentation (the page for each is cited where the file is listed in
`STREAMS` below). The proxy's end-to-end tests replay the same files, so keep them realistic:
change a number here and there together.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sserelay.providers.payloads as payloads
from sserelay.metering.tokens import WhitespaceCounter, count_tokens
from sserelay.metering.usage import Usage
from sserelay.providers.openai_chunks import openai_chunk, openai_usage_chunk
from sserelay.providers.payloads import (
    PAYLOAD_KINDS,
    Delta,
    PayloadMeter,
    detect_kind,
    parse_payload,
)
from sserelay.wire.sse import SSEDecoder

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
JSON_KINDS = ("openai", "responses", "anthropic", "ollama", "gemini")

# --------------------------------------------------------------------------- helpers

Payload = tuple[str, str | None]  # (data, SSE event name)


def payloads_of(
    wire: bytes, *, ndjson: bool = False, chunk_size: int | None = None
) -> list[Payload]:
    """What a proxy hands the meter: each SSE event's data and name, or each NDJSON line."""
    if ndjson:
        return [(line, None) for line in wire.decode().splitlines()]
    size = chunk_size or len(wire) or 1
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(wire), size):
        events.extend(decoder.decode(wire[start : start + size]))
    events.extend(decoder.flush())
    return [(event.data, event.event) for event in events]


def load(name: str) -> list[Payload]:
    return payloads_of((PAYLOADS / name).read_bytes(), ndjson=name.endswith(".ndjson"))


def meter_stream(payloads: list[Payload], kind: str = "auto") -> tuple[PayloadMeter, list[Delta]]:
    meter = PayloadMeter(kind)
    return meter, [meter.feed(data, event) for data, event in payloads]


def chunk(**fields: Any) -> str:
    return json.dumps(fields)


# --------------------------------------------------------------------------- recorded streams

STREAMS = [
    # OpenAI Chat Completions, no stream_options: a role-only first chunk (content ""), content
    # deltas ("Stream" + "ing" is one word), an empty delta with finish_reason, `data: [DONE]`.
    # Chunks carry `service_tier` and the random `obfuscation` padding. No usage is reported.
    # https://platform.openai.com/docs/api-reference/chat-streaming/streaming
    pytest.param(
        "openai_chat.sse",
        "openai",
        "Streaming lets a client render tokens as they arrive.",
        None,
        "gpt-4o-mini-2024-07-18",
        True,
        id="openai_chat",
    ),
    # The same with stream_options.include_usage: every chunk has `usage: null`, then a last
    # chunk with `choices: []` and the usage, then [DONE].
    # https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options
    pytest.param(
        "openai_chat_usage.sse",
        "openai",
        "The capital of France is Paris.",
        Usage(24, 7, 31, cached_tokens=0, reasoning_tokens=0),
        "gpt-4o-mini-2024-07-18",
        True,
        id="openai_chat_usage",
    ),
    # A tool call: content null, arguments in delta.tool_calls[].function.arguments,
    # finish_reason "tool_calls". 17 output tokens are billed, no text reaches the user.
    # https://platform.openai.com/docs/guides/function-calling#streaming
    pytest.param(
        "openai_chat_tool_call.sse",
        "openai",
        "",
        Usage(81, 17, 98, cached_tokens=0, reasoning_tokens=0),
        "gpt-4.1-2025-04-14",
        True,
        id="openai_chat_tool_call",
    ),
    # Legacy Completions (`object: text_completion`): text in choices[].text.
    # https://platform.openai.com/docs/api-reference/completions/object
    pytest.param(
        "openai_completions.sse",
        "openai",
        "\n\nOnce upon a time, a byte left home.",
        None,
        "gpt-3.5-turbo-instruct:20230824-v2",
        True,
        id="openai_completions",
    ),
    # Responses API: `event:` lines, sequence_number, response.created/in_progress, item and
    # part events, output_text.delta (with logprobs and obfuscation), then output_text.done,
    # content_part.done and output_item.done repeating the full text, and response.completed
    # with the usage. No [DONE].
    # https://platform.openai.com/docs/api-reference/responses-streaming
    # https://platform.openai.com/docs/guides/streaming-responses?api-mode=responses
    pytest.param(
        "responses.sse",
        "responses",
        "Server-sent events keep one HTTP response open and push each token the moment it exists.",
        Usage(18, 19, 37, cached_tokens=0, reasoning_tokens=0),
        "gpt-4.1-2025-04-14",
        True,
        id="responses",
    ),
    # Anthropic Messages, the "Basic streaming request" example's shape: message_start (input
    # and a placeholder output count), content_block_start, ping, text_delta blocks,
    # content_block_stop, message_delta (cumulative output_tokens), message_stop.
    # https://docs.anthropic.com/en/docs/build-with-claude/streaming#basic-streaming-request
    pytest.param(
        "anthropic.sse",
        "anthropic",
        "Hello! Tokens are counted as they stream past, not after.",
        Usage(25, 15, None, cached_tokens=0, cache_creation_tokens=0),
        "claude-sonnet-4-5-20250929",
        True,
        id="anthropic",
    ),
    # Extended thinking then a tool call: thinking_delta and signature_delta (not user text), a
    # text block, a tool_use block with input_json_delta, stop_reason tool_use.
    # https://docs.anthropic.com/en/docs/build-with-claude/streaming#streaming-request-with-extended-thinking
    # https://docs.anthropic.com/en/docs/build-with-claude/streaming#streaming-request-with-tool-use
    pytest.param(
        "anthropic_thinking_tool.sse",
        "anthropic",
        "I'll check the current weather in Paris for you.",
        Usage(423, 96, None, cached_tokens=0, cache_creation_tokens=0),
        "claude-sonnet-4-20250514",
        True,
        id="anthropic_thinking_tool",
    ),
    # Ollama /api/chat NDJSON: message.content per line, the last line `done: true` with
    # done_reason, durations, prompt_eval_count and eval_count.
    # https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion
    pytest.param(
        "ollama_chat.ndjson",
        "ollama",
        "The sky is blue because of Rayleigh scattering.",
        Usage(26, 11, None),
        "llama3.2",
        True,
        id="ollama_chat",
    ),
    # Ollama /api/generate NDJSON: `response` per line, `context` on the last. The prompt was
    # cached, so prompt_eval_count is absent (a known Ollama behaviour; langfuse discussion
    # #1179): input is "not reported", never 0.
    # https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-completion
    pytest.param(
        "ollama_generate.ndjson",
        "ollama",
        "Because the prompt was cached, only eval_count comes back.",
        Usage(None, 13, None),
        "llama3.2",
        True,
        id="ollama_generate",
    ),
    # Gemini streamGenerateContent?alt=sse: one GenerateContentResponse per event, CRLF line
    # ends and Google's `"key": value` spacing, usageMetadata as running totals on every chunk
    # (summing candidatesTokenCount would give 28, the report is 17), finishReason on the last.
    # https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent
    # https://ai.google.dev/gemini-api/docs/text-generation#streaming-responses
    pytest.param(
        "gemini.sse",
        "gemini",
        "Streams of bytes become a river of words,\nand every word is counted once.\n",
        Usage(11, 17, 28),
        "gemini-2.0-flash",
        True,
        id="gemini",
    ),
]


@pytest.mark.parametrize(("name", "kind", "text", "usage", "model", "done"), STREAMS)
def test_recorded_stream(
    name: str, kind: str, text: str, usage: Usage | None, model: str | None, done: bool
) -> None:
    meter, deltas = meter_stream(load(name))
    assert meter.kind == kind
    assert "".join(delta.text for delta in deltas) == text
    assert meter.usage == usage
    assert meter.model == model
    assert meter.done is done
    # only the last payload ends the stream
    assert [delta.done for delta in deltas] == [False] * (len(deltas) - 1) + [done]


@pytest.mark.parametrize(("name", "kind", "text", "usage", "model", "done"), STREAMS)
def test_recorded_stream_with_explicit_kind_reads_the_same(
    name: str, kind: str, text: str, usage: Usage | None, model: str | None, done: bool
) -> None:
    payloads = load(name)
    _, auto_deltas = meter_stream(payloads)
    explicit, explicit_deltas = meter_stream(payloads, kind)
    assert explicit_deltas == auto_deltas
    assert (explicit.kind, explicit.usage, explicit.model) == (kind, usage, model)


@pytest.mark.parametrize("name", sorted(p.name for p in PAYLOADS.glob("*.sse")))
def test_recorded_stream_split_one_byte_at_a_time_decodes_the_same(name: str) -> None:
    wire = (PAYLOADS / name).read_bytes()
    assert payloads_of(wire, chunk_size=1) == payloads_of(wire)


@pytest.mark.parametrize(("name", "kind", "text", "usage", "model", "done"), STREAMS)
def test_fragments_metered_over_the_joined_text(
    name: str, kind: str, text: str, usage: Usage | None, model: str | None, done: bool
) -> None:
    # "Stream" + "ing", "Ray" + "leigh": a word split across deltas is one token.
    _, deltas = meter_stream(load(name))
    counter = WhitespaceCounter()
    assert sum(counter.feed(delta.text) for delta in deltas) == count_tokens(text)


def test_plain_stream_is_raw_text_one_event_at_a_time() -> None:
    # As `sserelay serve` sends lines: each event is a whole chunk, so a raw relay counts
    # each payload on its own (joining "fox" and "jumps" would make one word of two).
    meter, deltas = meter_stream(load("plain.sse"))
    assert meter.kind == "raw"
    assert [d.text for d in deltas] == ["The quick brown fox", "jumps over", "the lazy dog."]
    assert (meter.usage, meter.model, meter.done) == (None, None, False)


def test_every_payload_file_is_listed() -> None:
    listed = {param.values[0] for param in STREAMS} | {"plain.sse"}
    on_disk = {p.name for p in PAYLOADS.iterdir() if not p.name.startswith(".")}
    assert listed == on_disk


def test_gemini_fixture_keeps_its_crlf_line_ends() -> None:
    wire = (PAYLOADS / "gemini.sse").read_bytes()
    assert wire.endswith(b"}\r\n\r\n")
    assert b"\n" not in wire.replace(b"\r\n", b"")


# --------------------------------------------------------------------------- one payload at a time

MODEL = "gpt-4o-mini"

PARSE_CASES = [
    # OpenAI Chat Completions
    pytest.param(
        "openai",
        chunk(model=MODEL, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
        None,
        Delta(model=MODEL),
        id="openai-role-only",
    ),
    pytest.param(
        "openai",
        chunk(choices=[{"index": 0, "delta": {"content": None, "tool_calls": [{"index": 0}]}}]),
        None,
        Delta(),
        id="openai-null-content-tool-call",
    ),
    pytest.param(
        "openai",
        chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        None,
        Delta(),
        id="openai-empty-delta",
    ),
    pytest.param(
        "openai",
        chunk(choices=[{"index": 0, "delta": {"content": " wor"}}], usage=None),
        None,
        Delta(text=" wor"),
        id="openai-content-usage-null",
    ),
    pytest.param(
        "openai",
        chunk(choices=[{"index": 0, "delta": {"refusal": "I can't help with that."}}]),
        None,
        Delta(text="I can't help with that."),
        id="openai-refusal-is-shown",
    ),
    pytest.param(
        "openai",
        chunk(object="text_completion", choices=[{"text": " Paris", "index": 0}]),
        None,
        Delta(text=" Paris"),
        id="openai-legacy-completion",
    ),
    pytest.param(
        "openai",
        chunk(
            choices=[],
            usage={"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
        ),
        None,
        Delta(usage=Usage(9, 12, 21)),
        id="openai-usage-chunk",
    ),
    pytest.param("openai", "[DONE]", None, Delta(done=True), id="openai-done"),
    pytest.param("openai", " [DONE]\n", None, Delta(done=True), id="openai-done-padded"),
    # OpenAI Responses
    pytest.param(
        "responses",
        chunk(type="response.output_text.delta", delta="Hi", obfuscation="xQ9"),
        "response.output_text.delta",
        Delta(text="Hi"),
        id="responses-text-delta",
    ),
    pytest.param(
        "responses",
        chunk(delta="Hi", sequence_number=4),
        "response.output_text.delta",
        Delta(text="Hi"),
        id="responses-type-only-on-event-line",
    ),
    pytest.param(
        "responses",
        chunk(type="response.output_text.done", text="Hi there"),
        None,
        Delta(),
        id="responses-done-text-not-counted-twice",
    ),
    pytest.param(
        "responses",
        chunk(type="response.reasoning_summary_text.delta", delta="**Thinking"),
        None,
        Delta(),
        id="responses-reasoning-summary-not-text",
    ),
    pytest.param(
        "responses",
        chunk(type="response.function_call_arguments.delta", delta='{"city"'),
        None,
        Delta(),
        id="responses-function-arguments-not-text",
    ),
    pytest.param(
        "responses",
        chunk(type="response.created", response={"model": "gpt-4.1", "usage": None}),
        None,
        Delta(model="gpt-4.1"),
        id="responses-created",
    ),
    pytest.param(
        "responses",
        chunk(
            type="response.completed",
            response={
                "model": "gpt-4.1",
                "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
            },
        ),
        None,
        Delta(usage=Usage(5, 7, 12), model="gpt-4.1", done=True),
        id="responses-completed",
    ),
    pytest.param(
        "responses",
        chunk(
            type="response.incomplete",
            response={"usage": {"input_tokens": 5, "output_tokens": 16, "total_tokens": 21}},
        ),
        None,
        Delta(usage=Usage(5, 16, 21), done=True),
        id="responses-incomplete-ends-too",
    ),
    pytest.param(
        "responses",
        chunk(type="response.failed", response={"usage": None, "error": {"code": "server_error"}}),
        None,
        Delta(done=True),
        id="responses-failed-ends-too",
    ),
    # Anthropic
    pytest.param(
        "anthropic",
        chunk(type="content_block_delta", index=0, delta={"type": "text_delta", "text": "Hel"}),
        "content_block_delta",
        Delta(text="Hel"),
        id="anthropic-text-delta",
    ),
    pytest.param(
        "anthropic",
        chunk(type="content_block_delta", delta={"type": "thinking_delta", "thinking": "Hmm"}),
        "content_block_delta",
        Delta(),
        id="anthropic-thinking-not-text",
    ),
    pytest.param(
        "anthropic",
        chunk(type="content_block_delta", delta={"type": "input_json_delta", "partial_json": "{"}),
        "content_block_delta",
        Delta(),
        id="anthropic-tool-input-not-text",
    ),
    pytest.param(
        "anthropic",
        chunk(
            type="message_start",
            message={"model": "claude-3-5-haiku-20241022", "usage": {"input_tokens": 8}},
        ),
        "message_start",
        Delta(usage=Usage(input_tokens=8), model="claude-3-5-haiku-20241022"),
        id="anthropic-message-start",
    ),
    pytest.param(
        "anthropic",
        chunk(type="message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3}),
        "message_delta",
        Delta(usage=Usage(output_tokens=3)),
        id="anthropic-message-delta",
    ),
    pytest.param(
        "anthropic",
        chunk(type="message_stop"),
        "message_stop",
        Delta(done=True),
        id="anthropic-stop",
    ),
    pytest.param("anthropic", chunk(type="ping"), "ping", Delta(), id="anthropic-ping"),
    pytest.param(
        "anthropic",
        chunk(type="error", error={"type": "overloaded_error", "message": "Overloaded"}),
        "error",
        Delta(),
        id="anthropic-error",
    ),
    pytest.param(
        "anthropic",
        chunk(delta={"type": "text_delta", "text": "x"}),
        "content_block_delta",
        Delta(text="x"),
        id="anthropic-type-only-on-event-line",
    ),
    # Ollama
    pytest.param(
        "ollama",
        chunk(model="llama3.2", message={"role": "assistant", "content": "The"}, done=False),
        None,
        Delta(text="The", model="llama3.2"),
        id="ollama-chat-line",
    ),
    pytest.param(
        "ollama",
        chunk(model="llama3.2", response=" sky", done=False),
        None,
        Delta(text=" sky", model="llama3.2"),
        id="ollama-generate-line",
    ),
    pytest.param(
        "ollama",
        chunk(model="qwen3", message={"role": "assistant", "content": "", "thinking": "Hmm"}),
        None,
        Delta(model="qwen3"),
        id="ollama-thinking-not-text",
    ),
    pytest.param(
        "ollama",
        chunk(model="llama3.2", response="", done=True, prompt_eval_count=4, eval_count=0),
        None,
        Delta(usage=Usage(4, 0), model="llama3.2", done=True),
        id="ollama-final-line-reports-zero",
    ),
    # Gemini
    pytest.param(
        "gemini",
        chunk(candidates=[{"content": {"parts": [{"text": "A"}, {"text": "B"}], "role": "model"}}]),
        None,
        Delta(text="AB"),
        id="gemini-parts",
    ),
    pytest.param(
        "gemini",
        chunk(
            candidates=[
                {"content": {"parts": [{"text": "Let me think", "thought": True}, {"text": "42"}]}}
            ]
        ),
        None,
        Delta(text="42"),
        id="gemini-thought-summary-not-text",
    ),
    pytest.param(
        "gemini",
        chunk(
            candidates=[{"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"}],
            usageMetadata={"promptTokenCount": 3, "candidatesTokenCount": 5, "totalTokenCount": 8},
            modelVersion="gemini-2.5-flash",
        ),
        None,
        Delta(text=".", usage=Usage(3, 5, 8), model="gemini-2.5-flash", done=True),
        id="gemini-last-chunk",
    ),
    pytest.param(
        "gemini",
        chunk(candidates=[{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}}]),
        None,
        Delta(),
        id="gemini-function-call-not-text",
    ),
    # raw: the data is the text, whatever it looks like
    pytest.param("raw", "hello world", None, Delta(text="hello world"), id="raw-text"),
    pytest.param("raw", "[DONE]", None, Delta(text="[DONE]"), id="raw-done-is-text"),
    pytest.param("raw", '{"choices": []}', None, Delta(text='{"choices": []}'), id="raw-json"),
]


@pytest.mark.parametrize(("kind", "data", "event", "expected"), PARSE_CASES)
def test_parse_payload(kind: str, data: str, event: str | None, expected: Delta) -> None:
    assert parse_payload(kind, data, event) == expected


DETECT_CASES = [
    pytest.param(chunk(object="chat.completion.chunk", choices=[]), None, "openai", id="openai"),
    pytest.param(chunk(object="text_completion", choices=[]), None, "openai", id="completions"),
    # Azure OpenAI's first chunk: prompt_filter_results, `object: ""`, empty choices.
    pytest.param(
        chunk(choices=[], created=0, id="", model="", object="", prompt_filter_results=[]),
        None,
        "openai",
        id="azure-prelude",
    ),
    pytest.param(chunk(type="response.created", response={}), None, "responses", id="responses"),
    pytest.param(chunk(delta="x"), "response.output_text.delta", "responses", id="responses-ev"),
    pytest.param(
        chunk(type="error", code="server_error", message="boom", sequence_number=3),
        "error",
        "responses",
        id="responses-error",
    ),
    pytest.param(chunk(type="message_start", message={}), None, "anthropic", id="anthropic"),
    pytest.param(chunk(type="ping"), "ping", "anthropic", id="anthropic-ping"),
    pytest.param(
        chunk(type="error", error={"type": "overloaded_error"}), "error", "anthropic", id="a-error"
    ),
    pytest.param(
        chunk(model="llama3.2", message={"content": "x"}, done=False), None, "ollama", id="ollama"
    ),
    pytest.param(chunk(model="llama3.2", response="x", done=True), None, "ollama", id="generate"),
    pytest.param(chunk(candidates=[]), None, "gemini", id="gemini"),
    pytest.param(chunk(usageMetadata={"promptTokenCount": 1}), None, "gemini", id="gemini-usage"),
    pytest.param("[DONE]", None, "raw", id="done"),
    pytest.param("", None, "raw", id="empty"),
    pytest.param("hello world", None, "raw", id="text"),
    pytest.param('{"msg": "hi"}', None, "raw", id="unknown-json"),
    pytest.param('{"error": {"message": "rate limited"}}', None, "raw", id="openai-error"),
    pytest.param("[1, 2]", None, "raw", id="json-list"),
    pytest.param("42", None, "raw", id="json-number"),
]


@pytest.mark.parametrize(("data", "event", "kind"), DETECT_CASES)
def test_detect_kind(data: str, event: str | None, kind: str) -> None:
    assert detect_kind(data, event) == kind


def test_payload_kinds() -> None:
    assert PAYLOAD_KINDS == ("auto", "openai", "responses", "anthropic", "ollama", "gemini", "raw")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("[DONE]", Delta(done=True)),
        ("hello", Delta(text="hello")),
        (chunk(type="message_stop"), Delta(done=True)),
        ('{"msg": "hi"}', Delta(text='{"msg": "hi"}')),
    ],
)
def test_parse_payload_auto_reads_one_payload(data: str, expected: Delta) -> None:
    assert parse_payload("auto", data) == expected


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown payload kind 'openia'"):
        parse_payload("openia", "{}")
    with pytest.raises(ValueError, match="unknown payload kind"):
        PayloadMeter("openia")


# --------------------------------------------------------------------------- usage


def test_usage_to_dict_keeps_none_apart_from_zero() -> None:
    assert Usage().to_dict() == {"input_tokens": None, "output_tokens": None, "total_tokens": None}
    assert Usage(3, 0, 3).to_dict() == {"input_tokens": 3, "output_tokens": 0, "total_tokens": 3}


def test_a_stream_that_reports_nothing_has_no_usage() -> None:
    meter, _ = meter_stream(load("openai_chat.sse"))
    assert meter.usage is None


def test_a_reported_zero_is_kept() -> None:
    meter = PayloadMeter()
    meter.feed(json.dumps(openai_chunk("c", MODEL, 1, role="assistant", content="")))
    meter.feed(json.dumps(openai_chunk("c", MODEL, 1, finish_reason="length")))
    meter.feed(json.dumps(openai_usage_chunk("c", MODEL, 1, prompt_tokens=12, completion_tokens=0)))
    meter.feed("[DONE]")
    assert meter.usage == Usage(12, 0, 12)
    assert meter.usage is not None and meter.usage.output_tokens == 0


@pytest.mark.parametrize(
    "report",
    [
        pytest.param({}, id="empty"),
        pytest.param({"prompt_tokens": None, "completion_tokens": None}, id="nulls"),
        pytest.param({"prompt_tokens": "12", "completion_tokens": True}, id="not-numbers"),
        pytest.param({"prompt_tokens": -1, "completion_tokens": 1.5}, id="not-counts"),
    ],
)
def test_a_usage_object_without_counts_reports_nothing(report: dict[str, object]) -> None:
    assert parse_payload("openai", chunk(choices=[], usage=report)).usage is None


def test_integral_float_counts_are_counts() -> None:
    usage = parse_payload("openai", chunk(choices=[], usage={"completion_tokens": 7.0}))
    assert usage == Delta(usage=Usage(output_tokens=7))


def test_ollama_zero_versus_missing_counts() -> None:
    reported = parse_payload("ollama", chunk(response="", done=True, eval_count=0))
    missing = parse_payload("ollama", chunk(response="", done=True))
    assert reported.usage == Usage(output_tokens=0)
    assert missing.usage is None


def test_anthropic_output_is_cumulative_take_the_last_never_sum() -> None:
    meter = PayloadMeter()
    start = {"model": "claude-sonnet-4-5", "usage": {"input_tokens": 25, "output_tokens": 1}}
    meter.feed(chunk(type="message_start", message=start), "message_start")
    assert meter.usage == Usage(25, 1)
    # The docs allow one or more message_delta events, each with the running total.
    meter.feed(chunk(type="message_delta", usage={"output_tokens": 7}), "message_delta")
    meter.feed(chunk(type="message_delta", usage={"output_tokens": 15}), "message_delta")
    meter.feed(chunk(type="message_stop"), "message_stop")
    assert meter.usage == Usage(25, 15)  # not 1 + 7 + 15, and the input from message_start


def test_anthropic_message_delta_input_count_overrides_when_present() -> None:
    # Some relays (and server tools) report a cumulative input_tokens in message_delta too;
    # a null one is "not reported" and keeps message_start's count.
    meter = PayloadMeter("anthropic")
    meter.feed(chunk(type="message_start", message={"usage": {"input_tokens": 25}}))
    meter.feed(chunk(type="message_delta", usage={"input_tokens": None, "output_tokens": 4}))
    assert meter.usage == Usage(25, 4)
    meter.feed(chunk(type="message_delta", usage={"input_tokens": 1210, "output_tokens": 90}))
    assert meter.usage == Usage(1210, 90)


def test_anthropic_fixture_is_not_summed() -> None:
    meter, deltas = meter_stream(load("anthropic.sse"))
    reported = [d.usage.output_tokens for d in deltas if d.usage is not None]
    assert reported == [1, 15]
    assert meter.usage is not None and meter.usage.output_tokens == 15


def test_gemini_usage_is_cumulative_take_the_last_never_sum() -> None:
    meter, deltas = meter_stream(load("gemini.sse"))
    reports = [d.usage for d in deltas if d.usage is not None]
    assert [u.output_tokens for u in reports] == [1, 10, 17]
    assert meter.usage == Usage(11, 17, 28)


def test_gemini_chunk_without_candidates_count_keeps_the_earlier_one() -> None:
    meter = PayloadMeter("gemini")
    meter.feed(chunk(usageMetadata={"promptTokenCount": 9, "candidatesTokenCount": 2}))
    meter.feed(chunk(usageMetadata={"promptTokenCount": 9, "totalTokenCount": 20}))
    assert meter.usage == Usage(9, 2, 20)


# --------------------------------------------------------------------------- auto-detection


def test_done_first_does_not_decide_the_kind() -> None:
    assert detect_kind("[DONE]") == "raw"
    meter = PayloadMeter()
    assert meter.feed("[DONE]") == Delta(done=True)
    assert meter.kind == "auto"
    first = openai_chunk("c", MODEL, 1, content="Hi")
    assert meter.feed(json.dumps(first)) == Delta(text="Hi", model=MODEL)
    assert meter.kind == "openai"


def test_blank_payloads_do_not_decide_the_kind() -> None:
    meter = PayloadMeter()
    assert meter.feed("") == Delta()
    assert meter.feed("  \r") == Delta()
    assert meter.kind == "auto"
    meter.feed(chunk(model="llama3.2", response="x", done=False))
    assert meter.kind == "ollama"


def test_unknown_json_is_not_metered_and_decides_nothing() -> None:
    # Issue 12: only answers that carry model text are metered (an error, a model list: 0).
    meter = PayloadMeter()
    error = '{"error": {"message": "upstream busy"}}'
    assert meter.feed(error) == Delta()
    assert meter.feed('{"object": "list", "data": [{"id": "gpt-4o"}]}') == Delta()
    assert meter.kind == "auto"
    meter.feed(chunk(type="message_stop"), "message_stop")
    assert meter.kind == "anthropic"


def test_auto_sticks_to_the_first_kind_found() -> None:
    meter = PayloadMeter()
    meter.feed(chunk(type="message_start", message={"usage": {"input_tokens": 3}}))
    # A payload shaped like another provider's is read as the stream's own: nothing here.
    assert meter.feed(json.dumps(openai_chunk("c", MODEL, 1, content="Hi"))) == Delta()
    assert meter.kind == "anthropic"


def test_plain_text_first_decides_raw() -> None:
    meter = PayloadMeter()
    assert meter.feed("hello") == Delta(text="hello")
    assert meter.kind == "raw"
    looks_like_openai = json.dumps(openai_chunk("c", MODEL, 1, content="Hi"))
    assert meter.feed(looks_like_openai) == Delta(text=looks_like_openai)
    # auto mode still takes [DONE] as the end, not as text
    assert meter.feed("[DONE]") == Delta(done=True)
    assert meter.done


def test_explicit_raw_meters_done_as_text() -> None:
    meter = PayloadMeter("raw")
    assert meter.feed("[DONE]") == Delta(text="[DONE]")
    assert not meter.done


def test_model_is_the_last_one_named() -> None:
    meter = PayloadMeter()
    meter.feed(chunk(choices=[], model="", prompt_filter_results=[]))  # Azure's nameless prelude
    assert meter.model is None
    meter.feed(json.dumps(openai_chunk("c", "gpt-4o-2024-08-06", 1, content="x")))
    assert meter.model == "gpt-4o-2024-08-06"


# --------------------------------------------------------------------------- malformed input

MALFORMED = [
    "{",
    '{"choices": [',
    "not json at all",
    "[" * 100_000,  # nesting deep enough to overflow the parser's recursion
    "1" * 5_000,  # an int longer than Python will parse
    "null",
    "42",
    '"a string"',
    "NaN",
    '{"choices": "x", "usage": [1]}',
    '{"choices": [1, null, {"delta": 5}, {"delta": {"content": 7}}]}',
    '{"type": "content_block_delta", "delta": "x"}',
    '{"type": "message_start", "message": []}',
    '{"type": "content_block_start", "content_block": {"type": "text", "text": null}}',
    '{"type": "response.completed", "response": {"usage": {"input_tokens": {}}}}',
    '{"candidates": [{"content": {"parts": "x"}}, null], "usageMetadata": 3}',
    '{"candidates": [{"content": {"parts": [{"text": ["x"]}]}, "finishReason": 1}]}',
    '{"message": "x", "done": "yes", "eval_count": -3}',
]


@pytest.mark.parametrize("kind", JSON_KINDS)
@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: d[:24])
def test_malformed_payload_never_raises_and_bills_nothing(kind: str, data: str) -> None:
    delta = parse_payload(kind, data)
    assert (delta.text, delta.usage) == ("", None)


@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: d[:24])
def test_malformed_payload_is_text_for_raw(data: str) -> None:
    assert parse_payload("raw", data) == Delta(text=data)


@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: d[:24])
def test_malformed_payload_never_raises_in_auto_meter(data: str) -> None:
    meter = PayloadMeter()
    assert meter.feed(data).usage is None
    assert meter.usage is None


# --------------------------------------------------------------------------- builders


def test_openai_chunk_builder() -> None:
    assert openai_chunk("chatcmpl-1", MODEL, 1700000000, content="Hi", role="assistant") == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hi"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert openai_chunk("c", MODEL, 1, finish_reason="stop")["choices"][0]["delta"] == {}


def test_openai_usage_chunk_builder() -> None:
    built = openai_usage_chunk("chatcmpl-1", MODEL, 1700000000, 10, 5)
    assert built["choices"] == []
    assert built["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def test_built_chunks_round_trip_through_the_meter() -> None:
    built = [
        openai_chunk("c", MODEL, 1, role="assistant", content=""),
        openai_chunk("c", MODEL, 1, content="Hello"),
        openai_chunk("c", MODEL, 1, content=" world"),
        openai_chunk("c", MODEL, 1, finish_reason="stop"),
        openai_usage_chunk("c", MODEL, 1, 3, 2),
    ]
    payloads: list[Payload] = [(json.dumps(b), None) for b in built]
    meter, deltas = meter_stream([*payloads, ("[DONE]", None)])
    assert (meter.kind, meter.model, meter.usage) == ("openai", MODEL, Usage(3, 2, 5))
    assert meter.done
    assert "".join(d.text for d in deltas) == "Hello world"


# --------------------------------------------------------------------------- purity


def test_payloads_import_only_the_standard_library_and_pure_metering() -> None:
    tree = ast.parse(Path(payloads.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    stdlib = {"__future__", "collections.abc", "contextlib", "dataclasses", "json", "typing"}
    # orjson: a JSON parser in C, optional (the `fast` extra), no I/O.
    assert imported <= stdlib | {"sserelay.metering.usage", "reported", "orjson"}


# --------------------------------------------------------------------------- orjson or json

_NUMBERS = st.sampled_from(
    [
        "0", "-0", "12", "12.0", "1e2", "1E+2", "-1.5e-3", "01", "1.", ".5", "+1", "0x10",
        "9223372036854775807", "9223372036854775808", "18446744073709551615",
        "18446744073709551616", "-9223372036854775809", "123456789012345678901234567890",
        "1e400", "-1e400", "4.9e-324", "1e-400", "NaN", "Infinity", "-Infinity",
        "0.30000000000000004", "2.2250738585072011e-308",
    ]
)  # fmt: skip
_STRINGS = st.sampled_from(
    ['"a"', '"\\ud800"', '"\\udc00x"', '"\\u00e9"', '"\u00e9"', '"\ud83d\ude00"',
     '"a\\nb"', '"\\""', '"\x01"', '"\ud800"', '"1234567890123456789012"']
)  # fmt: skip
_JSONISH = st.recursive(
    _NUMBERS | _STRINGS | st.sampled_from(["true", "false", "null"]),
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
        | st.lists(st.tuples(_STRINGS, inner), max_size=4).map(
            lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
        )
    ),
    max_leaves=12,
)


def _json_or_not(data: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return "<not JSON>"


def _same(a: object, b: object) -> bool:
    """Equal values of equal types all the way down (1 is not 1.0; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@pytest.mark.skipif(payloads._fast_loads is None, reason="orjson is not installed")
@given(st.one_of(_JSONISH, _JSONISH.map(lambda s: s + " x"), _JSONISH.map(lambda s: " " + s)))
def test_the_fast_parser_reads_every_value_as_json_does(data: str) -> None:
    value = payloads._load(data)
    assert _same("<not JSON>" if value is payloads._NOT_JSON else value, _json_or_not(data))


def test_deep_nesting_is_not_json_with_either_parser() -> None:
    assert payloads._load("[" * 100_000 + "]" * 100_000) is payloads._NOT_JSON


@pytest.mark.parametrize("name", ["openai_chat_usage.sse", "anthropic.sse", "gemini.sse"])
def test_recorded_streams_read_the_same_without_orjson(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = SSEDecoder().decode((PAYLOADS / name).read_bytes())

    def read() -> tuple[list[Delta], Usage | None]:
        meter = PayloadMeter()
        return [meter.feed(e.data, e.event) for e in events], meter.usage

    fast = read()
    monkeypatch.setattr(payloads, "_fast_loads", None)
    assert read() == fast


# --------------------------------------------------------------------------- property tests

# Provider-shaped JSON: the keys every parser looks at, with values of any JSON type, so the
# generated payloads reach the branches deep inside each parser.
KEYS = st.sampled_from(
    [
        "type", "choices", "delta", "content", "text", "refusal", "usage", "model", "message",
        "response", "done", "candidates", "parts", "thought", "usageMetadata", "finishReason",
        "modelVersion", "content_block", "error", "prompt_tokens", "completion_tokens",
        "total_tokens", "input_tokens", "output_tokens", "eval_count", "prompt_eval_count",
        "promptTokenCount", "candidatesTokenCount", "totalTokenCount",
    ]
)  # fmt: skip
TYPES = st.sampled_from(
    [
        "message_start", "message_delta", "message_stop", "content_block_start",
        "content_block_delta", "text_delta", "ping", "error", "response.created",
        "response.output_text.delta", "response.completed", "response.failed", "text",
    ]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | TYPES
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
PROVIDERISH = st.dictionaries(KEYS, JSON_VALUES, max_size=6).map(json.dumps)
EVENTS = st.none() | TYPES | st.text(max_size=12)


@given(kind=st.sampled_from(PAYLOAD_KINDS), data=st.text() | PROVIDERISH, event=EVENTS)
def test_parse_payload_never_raises(kind: str, data: str, event: str | None) -> None:
    delta = parse_payload(kind, data, event)
    if kind == "raw":
        assert delta == Delta(text=data)
    if delta.usage is not None:
        counts = list(delta.usage.to_dict().values())
        assert any(count is not None for count in counts)
        assert all(count is None or (type(count) is int and count >= 0) for count in counts)


@given(
    kind=st.sampled_from(PAYLOAD_KINDS),
    payloads=st.lists(st.tuples(st.text(max_size=20) | PROVIDERISH, EVENTS), max_size=8),
)
def test_payload_meter_never_raises(kind: str, payloads: list[Payload]) -> None:
    meter = PayloadMeter(kind)
    for data, event in payloads:
        meter.feed(data, event)
    assert meter.kind in PAYLOAD_KINDS
    if kind != "auto":
        assert meter.kind == kind
