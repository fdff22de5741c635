"""The mock's provider answers (sserelay.providers.answers): what they write, read back by the
payloads layer that meters real upstreams, so builder and parser agree on every provider."""

from __future__ import annotations

import json

import pytest

from sserelay.providers.answers import (
    DEFAULT_MODEL,
    PROVIDERS,
    MockRequest,
    models_list,
    new_answer,
    read_request,
)
from sserelay.providers.errors import error_body
from sserelay.providers.payloads import PayloadMeter, whole_answer
from sserelay.wire.sse import SSEDecoder, encode_event

CHUNKS = ["Hello", ' "quoted"\n', "\\ back\tslash", " émoji 🚀\r\n"]
KIND = {"openai": "openai", "anthropic": "anthropic", "openai-responses": "responses"}


def request(stream: bool = True, include_usage: bool = True) -> MockRequest:
    return MockRequest("m-1", stream, include_usage, ("prompt text",))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_streamed_answer_reads_back_as_its_text_usage_and_end(provider: str) -> None:
    answer = new_answer(provider, request(), "abc", 1700000000)
    events = answer.start()
    for chunk in CHUNKS:
        (event,) = answer.text(chunk)  # one event per chunk
        events.append(event)
    events += answer.end(2, 7)
    assert answer.text("") == []
    wire = b"".join(encode_event(event) for event in events)
    decoded = SSEDecoder().decode(wire)  # every payload is one data line: nothing split
    assert [e.data for e in decoded] == [e.data for e in events]
    meter = PayloadMeter()
    text = "".join(meter.feed(e.data, e.event).text for e in decoded)
    expected = (KIND[provider], "".join(CHUNKS), "m-1", True)
    assert (meter.kind, text, meter.model, meter.done) == expected
    assert meter.usage is not None
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (2, 7)


def test_openai_chunks_follow_the_api() -> None:
    answer = new_answer("openai", request(include_usage=False), "abc", 1)
    (first,) = answer.start()
    *last, done = answer.end(1, 1)
    assert json.loads(first.data)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(last[-1].data)["choices"][0]["finish_reason"] == "stop"
    assert done.data == "[DONE]" and len(last) == 1  # no usage chunk unless asked
    assert "usage" not in json.loads(first.data)


def test_anthropic_events_are_named_after_their_type() -> None:
    answer = new_answer("anthropic", request(), "abc", 1)
    events = [*answer.start(), *answer.text("x"), *answer.end(1, 1)]
    assert [e.event for e in events] == [json.loads(e.data)["type"] for e in events]
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_responses_events_are_numbered_in_order() -> None:
    answer = new_answer("openai-responses", request(), "abc", 1)
    events = [*answer.start(), *answer.text("x"), *answer.text("y"), *answer.end(1, 2)]
    numbers = [json.loads(e.data)["sequence_number"] for e in events]
    assert numbers == list(range(len(events)))
    completed = json.loads(events[-1].data)["response"]
    assert completed["output"][0]["content"][0]["text"] == "xy"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_whole_answer_reads_back_as_its_text_and_usage(provider: str) -> None:
    answer = new_answer(provider, request(stream=False), "abc", 1)
    whole = whole_answer(answer.whole("".join(CHUNKS), 3, 9))
    assert whole is not None
    assert (whole.text, whole.model) == ("".join(CHUNKS), "m-1")
    assert whole.usage is not None
    # The counts the mock writes read back (Responses also says 0 cached, 0 reasoning).
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (3, 9)
    assert whole.usage.total_tokens in (12, None)


@pytest.mark.parametrize(
    ("provider", "body", "expected"),
    [
        (
            "openai",
            {
                "model": "gpt",
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "x"}]},
                ],
            },
            MockRequest("gpt", True, True, ("be brief", "hi")),
        ),
        (
            "anthropic",
            {
                "model": "claude",
                "system": [{"type": "text", "text": "sys"}],
                "messages": [{"role": "user", "content": "hello"}],
            },
            MockRequest("claude", False, False, ("sys", "hello")),
        ),
        (
            "openai-responses",
            {"instructions": "be kind", "input": "a question", "stream": True},
            MockRequest(DEFAULT_MODEL, True, False, ("be kind", "a question")),
        ),
        (
            "openai-responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]},
            MockRequest(DEFAULT_MODEL, False, False, ("q",)),
        ),
    ],
)
def test_read_request_takes_what_the_mock_needs(
    provider: str, body: dict[str, object], expected: MockRequest
) -> None:
    assert read_request(provider, json.dumps(body).encode()) == expected


@pytest.mark.parametrize(
    ("provider", "body", "message"),
    [
        ("openai", b"not json", "not valid JSON"),
        ("openai", b"[1, 2]", "must be a JSON object"),
        ("openai", b'{"model": "m"}', "'messages' must be a list"),
        ("anthropic", b'{"messages": [1]}', "'messages' must be a list"),
        ("openai-responses", b'{"input": 5}', "'input' must be"),
    ],
)
def test_a_bad_request_is_a_value_error_with_one_line(
    provider: str, body: bytes, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        read_request(provider, body)


def test_errors_and_models_are_in_each_providers_shape() -> None:
    assert error_body("anthropic", "no")["error"] == {
        "type": "invalid_request_error",
        "message": "no",
    }
    assert error_body("openai", "no")["error"]["message"] == "no"
    assert models_list("openai")["data"][0]["id"] == DEFAULT_MODEL
    assert models_list("anthropic")["data"][0]["type"] == "model"
