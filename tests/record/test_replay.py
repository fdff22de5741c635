"""A recording as a source (sserelay.record.replay): its events, or the text inside its payloads."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from sserelay.errors import ConfigError, SourceError
from sserelay.metering.tokens import get_tokenizer
from sserelay.providers.payloads import PayloadMeter
from sserelay.record.format import (
    Block,
    Chunk,
    Exchange,
    Header,
    Recording,
    body_sha256,
    file_line,
    record_lines,
    split_blocks,
)
from sserelay.record.replay import (
    Cassette,
    ExchangeSource,
    RecordingSource,
    ReplayText,
    looks_like_recording,
    no_match_message,
)
from sserelay.sources.text import TimedBatch
from sserelay.streaming.relays import EventRelay
from sserelay.wire.sse import SSEDecoder

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"


def batches(source: ExchangeSource) -> list[TimedBatch]:
    async def collect() -> list[TimedBatch]:
        return [batch async for batch in source.batches()]

    return asyncio.run(collect())


def record_sse(path: Path, name: str) -> bytes:
    """A recording of the proxy relaying tests/payloads/NAME, one event per 0.1 s."""
    relay = EventRelay(PayloadMeter(), get_tokenizer("whitespace"))
    written = relay.decode((PAYLOADS / name).read_bytes()).payload
    blocks = written.split(b"\n\n")[:-1]
    lines = [Header("POST", "/v1", 200, "text/event-stream").line()]
    lines += [record_lines(i / 10, block + b"\n\n", sse=True) for i, block in enumerate(blocks)]
    path.write_text("".join(lines))
    return written


@pytest.mark.parametrize("name", ["openai_chat.sse", "anthropic.sse", "responses.sse"])
def test_events_and_text_of_a_recorded_stream(tmp_path: Path, name: str) -> None:
    path = tmp_path / "rec.jsonl"
    written = record_sse(path, name)
    assert looks_like_recording(str(path))
    events = batches(RecordingSource(str(path)))
    assert [b.chunks[0] for b in events] == [e.data for e in SSEDecoder().decode(written)]
    assert [b.at for b in events] == sorted(b.at for b in events)
    meter = PayloadMeter()
    want = "".join(meter.feed(e.data, e.event).text for e in SSEDecoder().decode(written))
    texts = batches(RecordingSource(str(path), as_text=True))
    assert "".join(c for b in texts for c in b.chunks) == want and want


def test_the_text_of_a_recorded_ndjson_body_however_its_writes_fell(tmp_path: Path) -> None:
    raw = (PAYLOADS / "ollama_chat.ndjson").read_bytes()
    path = tmp_path / "ollama.jsonl"
    writes = [raw[i : i + 7] for i in range(0, len(raw), 7)]  # lines cut anywhere
    lines = [Header("POST", "/api/chat", 200, "application/x-ndjson").line()]
    lines += [Chunk(i / 100, w).line() for i, w in enumerate(writes)]
    path.write_text("".join(lines))
    meter = PayloadMeter()
    want = "".join(meter.feed(line).text for line in raw.decode().splitlines())
    texts = batches(RecordingSource(str(path), as_text=True))
    assert "".join(c for b in texts for c in b.chunks) == want


@pytest.mark.parametrize(
    ("content_type", "payloads"),
    [
        ("text/event-stream", "events"),
        ("text/plain", "events"),
        ("application/json", "events"),
        ("application/problem+json", "events"),
        ("application/x-ndjson", "lines"),
    ],
)
def test_how_a_recording_holds_its_payloads(
    tmp_path: Path, content_type: str, payloads: str
) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text(Header("POST", "/", 200, content_type).line())
    assert RecordingSource(str(path)).payloads == payloads


@pytest.mark.parametrize("size", [1, 7, 50, 10_000])
def test_the_text_serve_bills_for_a_replayed_ndjson_body_however_its_writes_fell(
    size: int,
) -> None:
    raw = (PAYLOADS / "ollama_chat.ndjson").read_bytes()
    text = ReplayText("lines")
    got = "".join(text.feed(raw[i : i + size].decode()) for i in range(0, len(raw), size))
    meter = PayloadMeter()
    assert got == "".join(meter.feed(line).text for line in raw.decode().splitlines())
    assert text.payload.kind == "ollama"


def ollama_without_last_line_end() -> tuple[bytes, str]:
    """An Ollama body whose last line carries text and has no line end, and that text's whole."""
    lines = (PAYLOADS / "ollama_chat.ndjson").read_bytes().splitlines(keepends=True)
    raw = b"".join(lines[:-1]).rstrip(b"\n")  # ends in a content line, not the done line
    meter = PayloadMeter()
    text = "".join(meter.feed(line).text for line in raw.decode().splitlines())
    assert meter.feed(raw.decode().splitlines()[-1]).text  # the last line has text
    return raw, text


@pytest.mark.parametrize("size", [1, 7, 50, 10_000])
def test_a_last_ndjson_line_with_no_line_end_is_read_at_the_end(size: int) -> None:
    raw, want = ollama_without_last_line_end()
    text = ReplayText("lines")
    got = "".join(text.feed(raw[i : i + size].decode()) for i in range(0, len(raw), size))
    assert got + text.flush() == want
    assert text.flush() == ""  # once


def test_the_text_of_a_recorded_ndjson_body_includes_a_last_line_with_no_line_end(
    tmp_path: Path,
) -> None:
    raw, want = ollama_without_last_line_end()
    path = tmp_path / "ollama.jsonl"
    lines = [Header("POST", "/api/chat", 200, "application/x-ndjson").line()]
    writes = [raw[i : i + 50] for i in range(0, len(raw), 50)]
    lines += [Chunk(i / 100, w).line() for i, w in enumerate(writes)]
    path.write_text("".join(lines))
    texts = batches(RecordingSource(str(path), as_text=True))
    assert "".join(c for b in texts for c in b.chunks) == want
    assert texts[-1].at == (len(writes) - 1) / 100  # with the write that carried it


def test_the_text_of_a_recorded_plain_text_body_is_the_text_as_written(tmp_path: Path) -> None:
    text = 'Hello, wor|ld.\r\nA {"json": "look"} line\n|\nnaï|ve end'
    writes = [piece.encode() for piece in text.split("|")]
    writes[2:4] = [writes[2] + writes[3][:3], writes[3][3:]]  # "ï" cut in two by a write
    path = tmp_path / "text.jsonl"
    lines = [Header("GET", "/", 200, "text/plain").line()]
    lines += [Chunk(i / 100, w).line() for i, w in enumerate(writes)]
    path.write_text("".join(lines))
    texts = batches(RecordingSource(str(path), as_text=True))
    assert "".join(c for b in texts for c in b.chunks) == text.replace("|", "")
    assert [b.at for b in texts] == [0.0, 0.01, 0.02, 0.03]


def test_the_text_serve_bills_for_replayed_events_is_the_text_in_each_payload() -> None:
    events = SSEDecoder().decode((PAYLOADS / "anthropic_thinking_tool.sse").read_bytes())
    text = ReplayText("events")
    meter = PayloadMeter()
    assert [text.feed(e.data) for e in events] == [meter.feed(e.data).text for e in events]


def test_plain_text_is_not_a_recording_and_a_broken_one_is_a_source_error(
    tmp_path: Path,
) -> None:
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    assert not looks_like_recording(str(text)) and not looks_like_recording("-")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"sserelay_recording": 1}\n{"t": -1, "data": "x"}\n')
    with pytest.raises(SourceError, match="line 2"):
        RecordingSource(str(broken))


# Cassettes: which recorded exchange answers which request ---------------------------------


def recorded(number: int, method: str, path: str, body: bytes = b"") -> Exchange:
    headers = (("content-type", "application/json"),)
    return Exchange(number, method, path, body_sha256(body), 200, headers)


MODELS = recorded(1, "GET", "/v1/models")
HELLO = recorded(2, "POST", "/v1/chat/completions", b'{"messages": ["hello"]}')
BYE = recorded(3, "POST", "/v1/chat/completions", b'{"messages": ["bye"]}')
MESSAGE = recorded(4, "POST", "/v1/messages", b'{"messages": ["hello"]}')


def asked(cassette: Cassette, *requests: tuple[str, str, bytes]) -> list[int | None]:
    """The number of the exchange that answers each request in turn (None: none does)."""
    answers = [cassette.match(method, path, body_sha256(body)) for method, path, body in requests]
    return [None if answer is None else answer.number for answer in answers]


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("requests", "answers"),
    [
        # Method, path and body first, whatever the order they come in.
        ([("POST", CHAT, b'{"messages":["bye"]}'), ("GET", "/v1/models", b""),
          ("POST", CHAT, b'{"messages": ["hello"]}')], [3, 1, 2]),
        # The body canonical: keys and spaces as another client writes them.
        ([("POST", CHAT, b' {"messages" : [ "bye" ]}\n')], [3]),
        # No body matches: the next unused of that method and path, in order...
        ([("POST", CHAT, b'{"messages": ["new"]}'), ("POST", CHAT, b'{"messages": ["new"]}')],
         [2, 3]),
        # ... then the next unused at all (a recording of another API, replayed in another).
        ([("POST", "/v1/responses", b"{}"), ("POST", "/v1/responses", b"{}")], [1, 2]),
        # The same request again gets its answer again (a retry), before any fallback...
        ([("GET", "/v1/models", b""), ("GET", "/v1/models", b""), ("GET", "/v1/models", b"")],
         [1, 1, 1]),
        # ... also when a fallback took it first: a recorded request gets its own answer.
        ([("POST", CHAT, b'{"messages": ["new"]}'), ("POST", CHAT, b'{"messages": ["hello"]}'),
          ("POST", CHAT, b'{"messages": ["bye"]}')], [2, 2, 3]),
        # ... and a request unlike any recorded, once nothing is left, gets none.
        ([("PUT", "/x", b"1"), ("PUT", "/x", b"2"), ("PUT", "/x", b"3"), ("PUT", "/x", b"4"),
          ("PUT", "/x", b"5"), ("POST", CHAT, b'{"messages": ["bye"]}')],
         [1, 2, 3, 4, None, 3]),
    ],
)  # fmt: skip
def test_a_cassette_answers_by_request_then_falls_back_to_order(
    requests: list[tuple[str, str, bytes]], answers: list[int | None]
) -> None:
    assert asked(Cassette([MODELS, HELLO, BYE, MESSAGE]), *requests) == answers


def test_a_cassette_of_one_exchange_answers_every_request_and_an_empty_one_none() -> None:
    one = Cassette([HELLO])
    assert asked(one, ("GET", "/", b""), ("POST", CHAT, b"{}"), ("GET", "/", b"")) == [2, 2, 2]
    assert asked(Cassette([]), ("GET", "/", b"")) == [None]


def test_the_mock_s_answers_are_the_post_exchanges_or_the_only_one() -> None:
    many = Recording(2, (MODELS, HELLO, recorded(5, "DELETE", "/v1/x"), BYE))
    assert Cassette.of_answers(many).exchanges == (HELLO, BYE)
    only = Recording(2, (MODELS,))
    assert Cassette.of_answers(only).exchanges == (MODELS,)
    assert no_match_message("POST", CHAT, "ab" * 32) == (
        f"no recorded exchange for POST {CHAT} (body sha256 {'ab' * 32})"
    )


def test_serve_broadcasts_a_cassette_of_one_exchange_and_refuses_several(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    stream = Exchange(1, "POST", CHAT, None, 200, (("content-type", "text/event-stream"),))
    one.write_text(
        file_line() + stream.opening_line() + Block(0.1, "a").line(1) + Block(0.2, "b").line(1)
    )
    assert [b.chunks for b in batches(RecordingSource(str(one)))] == [["a"], ["b"]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(file_line())
    assert batches(RecordingSource(str(empty))) == []
    several = tmp_path / "several.jsonl"
    several.write_text(file_line() + MODELS.opening_line() + HELLO.opening_line())
    with pytest.raises(ConfigError, match=r"holds 2 recorded exchanges .* --as recorded") as info:
        RecordingSource(str(several))
    assert info.value.field == "source"


def test_the_text_of_one_exchange_of_a_cassette(tmp_path: Path) -> None:
    relay = EventRelay(PayloadMeter(), get_tokenizer("whitespace"))
    written = relay.decode((PAYLOADS / "anthropic.sse").read_bytes()).payload
    stream = Exchange(
        7, "POST", "/v1/messages", None, 200, (("content-type", "text/event-stream"),)
    )
    parts = tuple(split_blocks(0.5, written))
    source = ExchangeSource(replace(stream, parts=parts), as_text=True)
    meter = PayloadMeter()
    want = "".join(meter.feed(e.data, e.event).text for e in SSEDecoder().decode(written))
    assert "".join(c for b in batches(source) for c in b.chunks) == want and want


def test_the_text_of_a_recorded_whole_json_answer(tmp_path: Path) -> None:
    whole = {
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "All of it."}}],
    }
    body = json.dumps(whole).encode()
    answer = Exchange(
        1, "POST", "/v1/chat/completions", None, 200, (("content-type", "application/json"),)
    )
    parts = (Chunk(0.1, body[:10]), Chunk(0.2, body[10:]))  # written in two reads
    texts = batches(ExchangeSource(replace(answer, parts=parts), as_text=True))
    assert texts == [TimedBatch(0.2, ["All of it."])]
