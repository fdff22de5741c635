"""Tests for `sserelay.streaming.relays`: upstream bytes in, Frames for the client out, metered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sserelay.metering.tokens import count_tokens, get_tokenizer
from sserelay.metering.usage import Usage
from sserelay.providers.payloads import PayloadMeter, whole_answer
from sserelay.streaming.relays import (
    MAX_METERED_BODY,
    BodyRelay,
    EventRelay,
    LineRelay,
)
from sserelay.wire.frames import Frames
from sserelay.wire.sse import SSEDecoder

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
WORDS = get_tokenizer("whitespace")
SSE_FILES = sorted(p.name for p in PAYLOADS.glob("*.sse"))


def event_relay(**kwargs: bool) -> EventRelay:
    return EventRelay(PayloadMeter(), WORDS, **kwargs)


def run(relay: EventRelay | LineRelay | BodyRelay, pieces: list[bytes]) -> Frames:
    """Feed `pieces`, then end the body; one Frames with everything written and counted."""
    out: list[bytes] = []
    events = tokens = 0
    for piece in pieces:
        frames = relay.decode(piece)
        out.append(frames.payload)
        events += frames.events
        tokens += frames.tokens
    tail = relay.flush()
    return Frames(b"".join(out), events + tail.events, tokens + tail.tokens)


def split(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def reference(name: str) -> tuple[str, Usage | None]:
    meter = PayloadMeter()
    events = SSEDecoder().decode((PAYLOADS / name).read_bytes())
    return "".join(meter.feed(e.data, e.event).text for e in events), meter.usage


# --------------------------------------------------------------------------- SSE


@pytest.mark.parametrize("name", SSE_FILES)
@pytest.mark.parametrize("size", [1, 2, 7, 64, 1 << 20])
def test_provider_streams_relay_event_for_event_at_any_split(name: str, size: int) -> None:
    raw = (PAYLOADS / name).read_bytes()
    relay = event_relay()
    out = run(relay, split(raw, size))
    sent = SSEDecoder().decode(raw)
    assert SSEDecoder().decode(out.payload) == sent
    assert out.events == len(sent)
    if b"\r" not in raw and b": " not in raw.replace(b"data: ", b"").replace(b"event: ", b""):
        assert out.payload == raw  # canonical input is relayed byte for byte
    if name != "plain.sse":
        text, usage = reference(name)
        assert out.tokens == count_tokens(text)
        assert relay.payload.usage == usage
    assert relay.failure is None


@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40))
def test_any_split_of_a_stream_gives_the_same_frames(cuts: list[int]) -> None:
    raw = (PAYLOADS / "anthropic.sse").read_bytes()
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(raw[at : at + cut])
        at += cut
    pieces.append(raw[at:])
    whole = run(event_relay(), [raw])
    assert run(event_relay(), pieces) == whole


def test_a_word_split_across_two_deltas_is_one_token() -> None:
    def chunk(text: str) -> bytes:
        return f'data: {{"choices": [{{"delta": {{"content": "{text}"}}}}]}}\n\n'.encode()

    out = run(event_relay(), [chunk("Hel"), chunk("lo wor"), chunk("ld")])
    assert (out.events, out.tokens) == (3, 2)


def test_raw_events_are_counted_each_on_its_own() -> None:
    out = run(event_relay(), [b"data: The quick fox\n\ndata: jumps over\n\n"])
    assert out.tokens == 5


def test_one_read_with_several_events_is_one_frames() -> None:
    relay = event_relay()
    frames = relay.decode(b"data: a b\n\ndata: c\n\ndata: d")
    assert frames == Frames(b"data: a b\n\ndata: c\n\n", 2, 3)
    assert relay.decode(b"\n\n") == Frames(b"data: d\n\n", 1, 1)


def test_fields_are_kept_and_reencoded_in_order() -> None:
    raw = b"event: delta\r\nid: 7\r\nretry: 1500\r\ndata: one\r\ndata: two\r\n\r\n"
    out = run(event_relay(), [raw])
    assert out.payload == b"event: delta\nid: 7\nretry: 1500\ndata: one\ndata: two\n\n"


def test_blocks_without_data_keep_their_id_and_retry_and_nothing_else() -> None:
    out = run(event_relay(), [b"id: 3\n\nretry: 10\n\nevent: nothing\n\n\n\n"])
    assert out == Frames(b"id: 3\n\nretry: 10\n\n", 0, 0)


@pytest.mark.parametrize(
    ("block", "relayed"),
    [
        (b"id: a\x00b\ndata: x\n\n", b"data: x\n\n"),  # an id holding NUL is ignored (§9.2.6)
        (b"retry: 12ms\ndata: x\n\n", b"data: x\n\n"),  # retry only when all ASCII digits
        (b"custom-field: y\ndata: x\n\n", b"data: x\n\n"),  # an unknown field is ignored
        (b"data\ndata: x\n\n", b"data: \ndata: x\n\n"),  # no colon: the value is empty
        (b"data:x\n\n", b"data: x\n\n"),
        (b"data:  x\n\n", b"data:  x\n\n"),  # only one space is stripped
        (b"event:\ndata: x\n\n", b"data: x\n\n"),  # an empty type is the default one
    ],
)
def test_field_rules(block: bytes, relayed: bytes) -> None:
    assert run(event_relay(), [block]).payload == relayed


def test_a_leading_bom_is_dropped() -> None:
    assert run(event_relay(), [b"\xef\xbb\xbfdata: x\n\n"]).payload == b"data: x\n\n"


def test_comments_are_dropped_by_default_and_kept_on_request() -> None:
    raw = b": ping\n\ndata: a\n: inside\ndata: b\n\n"
    assert run(event_relay(), [raw]).payload == b"data: a\ndata: b\n\n"
    kept = run(event_relay(keep_comments=True), [raw]).payload
    assert kept == b": ping\n\n: inside\ndata: a\ndata: b\n\n"
    assert SSEDecoder().decode(kept) == SSEDecoder().decode(raw)


def test_a_line_that_is_not_sse_fails_after_relaying_what_came_before() -> None:
    relay = event_relay()
    frames = relay.decode(b'data: ok\n\n{"error": "boom"}\n\ndata: after\n\n')
    assert frames == Frames(b"data: ok\n\n", 1, 1)
    assert relay.failure is not None
    assert "not SSE" in str(relay.failure)
    assert relay.decode(b"data: more\n\n") == Frames(b"", 0, 0)


@pytest.mark.parametrize("tail", [b"data: cut", b"data: cut\n", b"data: x\ndata: y\n"])
def test_a_stream_that_ends_mid_event_fails(tail: bytes) -> None:
    relay = event_relay()
    run(relay, [b"data: whole\n\n" + tail])
    assert relay.failure is not None
    assert "middle of an event" in str(relay.failure)


@pytest.mark.parametrize("tail", [b"", b"\n", b": comment\n", b"id: 4\n"])
def test_a_clean_end_is_not_a_failure(tail: bytes) -> None:
    relay = event_relay()
    run(relay, [b"data: whole\n\n" + tail])
    assert relay.failure is None


def test_strip_usage_drops_only_the_usage_chunk_but_records_its_usage() -> None:
    raw = (PAYLOADS / "openai_chat_usage.sse").read_bytes()
    relay = event_relay(strip_usage=True)
    out = run(relay, split(raw, 100))
    datas = [e.data for e in SSEDecoder().decode(out.payload)]
    assert len(datas) == len(SSEDecoder().decode(raw)) - 1
    assert not any(json.loads(d).get("choices") == [] for d in datas if d != "[DONE]")
    assert relay.stripped == 1
    assert relay.payload.usage == Usage(24, 7, 31, cached_tokens=0, reasoning_tokens=0)


# --------------------------------------------------------------------------- other bodies


@pytest.mark.parametrize("size", [1, 5, 1 << 20])
def test_ndjson_passes_unchanged_and_is_metered_per_line(size: int) -> None:
    raw = (PAYLOADS / "ollama_chat.ndjson").read_bytes()
    relay = LineRelay(PayloadMeter(), WORDS, text=False)
    out = run(relay, split(raw, size))
    meter = PayloadMeter()
    text = "".join(meter.feed(line).text for line in raw.decode().splitlines())
    assert out == Frames(raw, len(raw.splitlines()), count_tokens(text))
    assert relay.payload.usage == meter.usage


def test_a_json_line_is_billed_with_the_chunk_that_completes_it() -> None:
    relay = LineRelay(PayloadMeter(), WORDS, text=False)
    first = relay.decode(b'{"model":"m","message":{"content":"two words"},')
    assert (first.payload, first.events, first.tokens) == (
        b'{"model":"m","message":{"content":"two words"},',
        0,
        0,
    )
    assert relay.decode(b'"done":false}\n') == Frames(b'"done":false}\n', 1, 2)


def test_plain_text_is_metered_as_it_arrives_across_chunks_and_utf8_splits() -> None:
    relay = LineRelay(PayloadMeter(), WORDS, text=True)
    text = "naïve words split mid-word".encode()
    out = run(relay, split(text, 3))
    assert out.payload == text
    assert out.tokens == 4


@pytest.mark.parametrize("text", [False, True])
def test_a_last_line_with_no_line_end_is_metered_when_the_body_ends(text: bool) -> None:
    body = b'{"message":{"content":"two words"},"done":false}\n'
    body += b'{"message":{"content":" and three more"},"done":true}'
    relay = LineRelay(PayloadMeter(), WORDS, text=text)
    assert relay.decode(body).payload == body
    tail = relay.flush()  # NDJSON: the last payload, read now; text: counted as it came
    assert tail.payload == b""
    out = run(LineRelay(PayloadMeter(), WORDS, text=text), split(body, 3))
    assert out.tokens == (count_tokens(body.decode()) if text else 5)


def test_raw_text_lines_count_each_line_on_its_own() -> None:
    relay = LineRelay(PayloadMeter("raw"), WORDS, text=False)
    assert run(relay, [b"one two\nthree"]) == Frames(b"one two\nthree", 2, 3)


OPENAI = {
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"message": {"role": "assistant", "content": "three words here"}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
}
RESPONSES = {
    "object": "response",
    "model": "gpt-4.1",
    "output": [
        {"type": "reasoning", "summary": []},
        {"type": "message", "content": [{"type": "output_text", "text": "two words"}]},
    ],
    "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11},
}
ANTHROPIC = {
    "type": "message",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "one"}],
    "usage": {"input_tokens": 4, "output_tokens": 0},
}
OLLAMA = {"model": "llama3.2", "message": {"content": "a b c d"}, "done": True, "eval_count": 4}


@pytest.mark.parametrize(
    ("answer", "tokens", "usage", "model"),
    [
        (OPENAI, 3, Usage(5, 3, 8), "gpt-4o-mini"),
        (RESPONSES, 2, Usage(9, 2, 11), "gpt-4.1"),
        (ANTHROPIC, 1, Usage(4, 0, None), "claude-sonnet-4-5"),
        (OLLAMA, 4, Usage(None, 4, None), "llama3.2"),
    ],
)
def test_whole_json_answers_are_metered_from_text_and_usage(
    answer: dict[str, object], tokens: int, usage: Usage, model: str
) -> None:
    raw = json.dumps(answer).encode()
    relay = BodyRelay(PayloadMeter(), WORDS)
    out = run(relay, split(raw, 10))
    assert out == Frames(raw, 1, tokens)
    assert relay.payload.usage == usage
    assert relay.payload.model == model


def test_a_json_array_of_chunks_is_metered_as_one_stream() -> None:
    events = SSEDecoder().decode((PAYLOADS / "gemini.sse").read_bytes())
    raw = json.dumps([json.loads(e.data) for e in events]).encode()
    relay = BodyRelay(PayloadMeter(), WORDS)
    text, usage = reference("gemini.sse")
    assert run(relay, [raw]).tokens == count_tokens(text)
    assert relay.payload.usage == usage


def test_error_bodies_and_unknown_shapes_are_not_metered() -> None:
    relay = BodyRelay(PayloadMeter(), WORDS, meter=False)
    assert run(relay, [json.dumps(OPENAI).encode()]).tokens == 0
    assert relay.payload.usage is None
    assert whole_answer({"error": {"message": "no"}}) is None
    assert run(BodyRelay(PayloadMeter(), WORDS), [b"not json"]) == Frames(b"not json", 0, 0)


def test_a_body_too_big_to_meter_still_passes_through() -> None:
    relay = BodyRelay(PayloadMeter(), WORDS)
    big = b" " * (MAX_METERED_BODY + 1)
    assert run(relay, [big]) == Frames(big, 0, 0)


# --------------------------------------------------------------------------- the pass-through

# Lines an upstream may write: canonical ones (passed on as they came) and every kind the
# slow path reads differently (normalised, dropped, or a failure).
_LINES = [
    b'data: {"choices": [{"delta": {"content": " one two"}}], "model": "m"}',
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}',
    b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a b"}}',
    b"data: [DONE]",
    b"data: plain words",
    b"data: ",
    b"data:  two spaces",
    b"data:nospace",
    b"data",
    b"event: content_block_delta",
    b"event: ",
    b"id: 7",
    b"retry: 100",
    b": a comment",
    b"custom: field",
    b"not sse",
    b"data: caf\xc3\xa9",
    b"data: \xff bad utf-8",
    b"\xef\xbb\xbfdata: bom",
    b"",
]


@settings(max_examples=300)
@given(
    lines=st.lists(st.sampled_from(_LINES), max_size=14),
    ends=st.lists(st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"]), min_size=14),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
    strip=st.booleans(),
    keep=st.booleans(),
)
def test_the_pass_through_gives_what_parsing_and_re_encoding_gives(
    lines: list[bytes], ends: list[bytes], cuts: list[int], strip: bool, keep: bool
) -> None:
    raw = b"".join(line + end for line, end in zip(lines, ends, strict=False)) + b"\n"
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]

    def relayed(fast: bool) -> tuple[object, ...]:
        relay = EventRelay(PayloadMeter(), WORDS, keep_comments=keep, strip_usage=strip)
        if not fast:
            relay._blocks.data_blocks = lambda chunk: None  # type: ignore[method-assign]
        frames = [relay.decode(piece) for piece in pieces]
        tail = relay.flush()
        failure = None if relay.failure is None else str(relay.failure)
        usage = relay.payload.usage
        return frames, tail, failure, relay.stripped, usage, relay.invalid_utf8_bytes

    assert relayed(fast=True) == relayed(fast=False)


def test_canonical_reads_pass_on_as_they_came() -> None:
    relay = event_relay()
    chunk = b'event: delta\ndata: {"a": 1}\ndata: two\n\ndata: x\n\n'
    frames = relay.decode(chunk)
    assert frames.payload is chunk  # the very bytes read: no copy
    assert (frames.events, frames.tokens) == (2, 4)
