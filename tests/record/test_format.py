"""The recording format (sserelay.record.format): pure round trips of version 2 (cassettes of
interleaved exchanges), version 1 still read, strict errors with line numbers, and the
canonical body hash requests are matched by."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.errors import RecordingError
from sserelay.metering.tokens import get_tokenizer
from sserelay.providers.payloads import PayloadMeter
from sserelay.record.format import (
    CANONICAL_LIMIT,
    Block,
    Chunk,
    Exchange,
    Header,
    Part,
    body_sha256,
    end_line,
    file_line,
    is_recording,
    kept_headers,
    record_lines,
    split_blocks,
)
from sserelay.record.reading import read_recording
from sserelay.streaming.relays import EventRelay

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
HEADER = Header("POST", "/v1/chat/completions", 200, "text/event-stream")
SSE = (("content-type", "text/event-stream"),)
SHA = hashlib.sha256(b"{}").hexdigest()


def exchange(number: int = 1, **fields: Any) -> Exchange:
    values: dict[str, Any] = {
        "method": "POST",
        "path": "/v1/chat/completions",
        "body_sha256": SHA,
        "status": 200,
        "headers": SSE,
    }
    return Exchange(number, **(values | fields))


def relayed(raw: bytes, keep_comments: bool = False) -> bytes:
    """What the proxy writes to its client for an upstream body `raw`."""
    relay = EventRelay(PayloadMeter(), get_tokenizer("whitespace"), keep_comments=keep_comments)
    return relay.decode(raw).payload


def lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


@pytest.mark.parametrize("name", sorted(p.name for p in PAYLOADS.glob("*.sse")))
def test_every_relayed_payload_file_round_trips_byte_for_byte(name: str) -> None:
    written = relayed((PAYLOADS / name).read_bytes())
    text = (
        file_line() + exchange().opening_line() + record_lines(0.5, written, sse=True, exchange=1)
    )
    (got,) = read_recording(lines(text + end_line(1, 0.6, "complete"))).exchanges
    assert b"".join(part.wire() for part in got.parts) == written
    assert all(part.t == 0.5 for part in got.parts)
    assert (got.end, got.ended_at, got.complete) == ("complete", 0.6, True)


@pytest.mark.parametrize("name", sorted(p.name for p in PAYLOADS.glob("*.sse")))
def test_a_version_1_recording_is_still_read_as_one_exchange(name: str) -> None:
    written = relayed((PAYLOADS / name).read_bytes())
    recording = read_recording(lines(HEADER.line() + record_lines(0.5, written, sse=True)))
    assert recording.version == 1
    (got,) = recording.exchanges
    assert b"".join(part.wire() for part in got.parts) == written
    assert (got.number, got.method, got.path, got.status) == (1, "POST", HEADER.path, 200)
    assert got.headers == SSE and got.sse and got.body_sha256 is None
    # Version 1 kept no ending: it has always been replayed as a whole answer.
    assert got.complete


@pytest.mark.parametrize(
    "wire",
    [
        b"data: plain\n\n",
        b"event: message_start\nid: 7\nretry: 3000\ndata: {}\n\n",
        b"data: two\ndata: lines\n\n",
        b'data: {"text": "quote \\" and \\n escaped"}\n\n',
        b"data: \n\n",  # an event with empty data is not a block without data
        b"id: 9\n\n",
        b"retry: 10\n\n",
        b": kept comment\ndata: x\n\n",
        b": only a comment\n\n",
        b"id: \ndata: empty id\n\n",
    ],
)
def test_blocks_round_trip(wire: bytes) -> None:
    (block,) = split_blocks(1.0, wire)
    assert block.wire() == wire
    again = read_recording([file_line(), exchange().opening_line(), block.line(1)])
    assert again.exchanges[0].parts == (block,)
    assert read_recording([HEADER.line(), block.line()]).exchanges[0].parts == (block,)


def test_a_write_of_several_blocks_is_one_line_each() -> None:
    text = record_lines(0.25, b"data: a\n\nevent: e\ndata: b\n\n", sse=True, exchange=3)
    assert [json.loads(line) for line in text.splitlines()] == [
        {"exchange": 3, "t": 0.25, "event": None, "id": None, "retry": None, "data": "a"},
        {"exchange": 3, "t": 0.25, "event": "e", "id": None, "retry": None, "data": "b"},
    ]


def test_an_exchange_opens_with_its_request_and_the_answer_s_status_and_headers() -> None:
    headers = (("content-type", "application/json"), ("x-request-id", "req_1"))
    line = exchange(2, method="GET", path="/v1/models", headers=headers, t=0.125).opening_line()
    assert json.loads(line) == {
        "exchange": 2,
        "t": 0.125,
        "method": "GET",
        "path": "/v1/models",
        "body_sha256": SHA,
        "status": 200,
        "headers": [["content-type", "application/json"], ["x-request-id", "req_1"]],
    }
    assert json.loads(file_line()) == {"sserelay_recording": 2}
    assert json.loads(end_line(2, 0.5, "cut")) == {"exchange": 2, "t": 0.5, "end": "cut"}


def test_chunks_are_text_or_base64() -> None:
    text = Chunk(0.1, b'{"done": false}\n')
    cut = Chunk(0.2, "é".encode()[:1])  # a character cut in two by the read
    assert json.loads(text.line(1)) == {"exchange": 1, "t": 0.1, "chunk": '{"done": false}\n'}
    assert json.loads(cut.line(1)) == {"exchange": 1, "t": 0.2, "chunk_base64": "ww=="}
    ndjson = exchange(headers=(("content-type", "application/x-ndjson"),))
    recording = read_recording([file_line(), ndjson.opening_line(), text.line(1), cut.line(1)])
    (got,) = recording.exchanges
    assert not got.sse and got.content_type == "application/x-ndjson"
    assert got.parts == (text, cut)


def test_interleaved_exchanges_are_read_apart_and_ordered_by_number() -> None:
    text = (
        file_line()
        + exchange(2).opening_line()
        + Block(0.1, "two-a").line(2)
        + exchange(1, method="GET", path="/v1/models").opening_line()
        + Block(0.2, "two-b").line(2)
        + Chunk(0.05, b"{}").line(1)
        + end_line(1, 0.06, "complete")
        + end_line(2, 0.3, "cut")
    )
    first, second = read_recording(lines(text)).exchanges
    assert (first.number, first.path, first.parts, first.end) == (
        1,
        "/v1/models",
        (Chunk(0.05, b"{}"),),
        "complete",
    )
    assert second.parts == (Block(0.1, "two-a"), Block(0.2, "two-b"))
    assert second.end == "cut" and not second.complete


def test_an_exchange_without_its_end_line_was_cut_by_a_crash() -> None:
    text = file_line() + exchange().opening_line() + Block(0.1, "a").line(1)
    (got,) = read_recording(lines(text)).exchanges
    assert got.end is None and got.ended_at is None and not got.complete


def test_a_cut_short_last_line_is_dropped_but_not_one_in_the_middle() -> None:
    head = [file_line(), exchange().opening_line()]
    good = Block(0.1, "a").line(1)
    parts = read_recording([*head, good, '{"exchange": 1, "t": 0.2, "da']).exchanges[0].parts
    assert parts == (Block(0.1, "a"),)
    with pytest.raises(RecordingError, match="line 3: not JSON"):
        read_recording([*head, '{"exchange": 1, "t": 0.2, "da\n', good])


OPEN = exchange().opening_line()
V2 = file_line()


def opening(old: str, new: str) -> list[str]:
    """A cassette whose one opening line has `old` replaced by `new`."""
    return [V2, OPEN.replace(old, new)]


def after_open(*lines: str) -> list[str]:
    return [V2, OPEN, *lines]


CUT = end_line(1, 1, "cut")
HEADERS = '[["content-type", "text/event-stream"]]'


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no header"),
        (['{"hello": 1}\n'], "not a sserelay recording"),
        (['{"sserelay_recording": 99}\n'], "format version 99; this sserelay reads 1 and 2"),
        (['{"sserelay_recording": true}\n'], "format version True"),
        (["hello\n"], "line 1: not JSON"),
        # version 1
        ([HEADER.line(), '{"data": "x"}\n'], "line 2: 't' must be"),
        ([HEADER.line(), '{"t": 1, "data": "\\ud800"}\n'], "not valid Unicode"),
        ([HEADER.line(), '{"t": 1, "event": "a\\nb", "data": "x"}\n'], "line end"),
        ([HEADER.line(), '{"t": 1, "retry": -1, "data": "x"}\n'], "retry"),
        ([HEADER.line(), '{"t": 1, "chunk_base64": "!!"}\n'], "base64"),
        ([HEADER.line(), "[1]\n"], "expected a JSON object"),
        # version 2
        ([V2, '{"t": 1, "data": "x"}\n'], "line 2: 'exchange' must be"),
        ([V2, '{"exchange": 0, "t": 1, "data": "x"}\n'], "line 2: 'exchange' must be"),
        ([V2, '{"exchange": 1, "t": 1, "data": "x"}\n'], "line 2: exchange 1 is not opened"),
        (after_open(OPEN), "line 3: exchange 1 was opened on line 2"),
        (after_open(CUT, Block(2, "x").line(1)), "line 4: exchange 1 ended on line 3"),
        (after_open(CUT, CUT), "line 4: exchange 1 ended on line 3"),
        (after_open('{"exchange": 1, "t": 1, "end": "maybe"}\n'), "line 3: 'end' must be"),
        (after_open('{"exchange": 1, "t": NaN, "data": "x"}\n'), "line 3: 't' must be"),
        (after_open('{"exchange": 1, "t": Infinity, "end": "cut"}\n'), "line 3: 't' must"),
        (opening('"POST"', '"PO ST"'), "line 2: not a request method"),
        (opening('"status": 200', '"status": 42'), "line 2: not an HTTP status"),
        (opening('"status": 200', '"status": 1000'), "line 2: not an HTTP status"),
        (opening('"status": 200', '"status": "200"'), "line 2: not an HTTP status"),
        (opening(SHA, "abc"), "line 2: 'body_sha256' must be 64"),
        (opening('"text/event-stream"', '"a\\r\\nx-evil: 1"'), "line 2: not a response header"),
        (opening('"content-type"', '"content type"'), "line 2: not a response header"),
        (opening(HEADERS, '{"a": "b"}'), "line 2: 'headers' must be"),
        (opening('"path": "/v1/chat/completions", ', ""), "line 2: expected a string"),
    ],
)
def test_what_is_not_a_recording_is_refused_with_the_line(lines: list[str], message: str) -> None:
    with pytest.raises(RecordingError, match=message):
        read_recording(lines)


def test_is_recording_looks_at_the_first_line() -> None:
    assert is_recording(file_line().encode())
    assert is_recording(HEADER.line().encode())
    assert not is_recording(b"Hello world\n")
    assert not is_recording(b'{"model": "x"}\n')


def test_kept_headers_leave_out_the_transport_s_and_credentials() -> None:
    headers = [
        ("Content-Type", "text/event-stream"),
        ("Set-Cookie", "session=1"),
        ("Authorization", "Bearer x"),
        ("WWW-Authenticate", "Bearer"),
        ("Date", "Mon, 1 Jan 2024 00:00:00 GMT"),
        ("Content-Length", "12"),
        ("x-request-id", "req_1"),
        ("x-ratelimit-remaining-tokens", "9000"),
        ("x-request-id", "again"),
    ]
    assert kept_headers(headers) == (
        ("content-type", "text/event-stream"),
        ("x-request-id", "req_1"),
        ("x-ratelimit-remaining-tokens", "9000"),
        ("x-request-id", "again"),
    )


# The body hash ----------------------------------------------------------------------------


def test_a_json_body_is_hashed_canonical() -> None:
    canonical = b'{"a":[1,2.5,"\\u00e9"],"b":{"c":null,"d":true}}'
    assert body_sha256(canonical) == hashlib.sha256(canonical).hexdigest()
    for same in (
        b'{"b": {"d": true, "c": null}, "a": [1, 2.5, "\xc3\xa9"]}',
        b'\n  {"b":{"c":null,"d":true},\t"a":[1,2.5,"\\u00e9"]}\n',
    ):
        assert body_sha256(same) == body_sha256(canonical)
    assert body_sha256(b'{"a": [2, 1]}') != body_sha256(b'{"a": [1, 2]}')  # order of a list counts
    assert body_sha256(b'{"a": 1}') != body_sha256(b'{"a": "1"}')


BIG = b'{"b": 1, "a": "' + b"x" * CANONICAL_LIMIT + b'"}'


@pytest.mark.parametrize(
    "raw",
    [b"", b"model=x&stream=true", b"\xff\xfe not UTF-8", b"{not json", b"[" * 100_000, BIG],
)
def test_any_other_body_is_hashed_raw(raw: bytes) -> None:
    assert body_sha256(raw) == hashlib.sha256(raw).hexdigest()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values, st.sampled_from([None, 0, 2]), st.booleans(), st.booleans())
def test_how_a_json_body_is_written_does_not_change_its_hash(
    value: object, indent: int | None, sort_keys: bool, ascii_only: bool
) -> None:
    compact = json.dumps(value).encode()
    written = json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ascii_only)
    assert body_sha256(written.encode()) == body_sha256(compact)


# Round trips ------------------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=20)
seconds = st.floats(min_value=0, max_value=1000, allow_nan=False).map(lambda t: round(t, 6))
blocks = st.builds(
    Block,
    seconds,
    st.none() | texts,
    st.none() | texts.filter(lambda s: "\n" not in s and "\r" not in s),
    st.none() | texts.filter(lambda s: not any(c in s for c in "\r\n\0")),
    st.none() | st.integers(min_value=0, max_value=10**6),
    st.lists(texts.filter(lambda s: "\n" not in s and "\r" not in s).map(":".__add__)).map(tuple),
)
chunks = st.builds(Chunk, seconds, st.binary(max_size=30))


@st.composite
def cassettes(draw: st.DrawFn) -> tuple[list[Exchange], list[str]]:
    """Exchanges and the lines of a cassette of them, their lines interleaved at random."""
    exchanges: list[Exchange] = []
    streams: list[list[str]] = []
    for number in range(1, draw(st.integers(0, 4)) + 1):
        sse = draw(st.booleans())
        kind = "text/event-stream" if sse else "application/x-ndjson"
        parts: list[Part] = draw(st.lists(blocks if sse else chunks, max_size=5))
        end = draw(st.sampled_from([None, "complete", "cut"]))
        ended_at = None if end is None else draw(seconds)
        body = draw(st.binary(max_size=20))
        made = Exchange(
            number,
            draw(st.sampled_from(["GET", "POST", "DELETE"])),
            "/" + draw(st.text("abc/", max_size=8)),
            body_sha256(body),
            draw(st.integers(100, 599)),
            (("content-type", kind), ("x-id", draw(st.text("xyz", max_size=3)))),
            t=draw(seconds),
            parts=tuple(parts),
            end=end,
            ended_at=ended_at,
        )
        exchanges.append(made)
        stream = [made.opening_line(), *(part.line(number) for part in parts)]
        if end is not None:
            assert ended_at is not None
            stream.append(end_line(number, ended_at, end))
        streams.append(stream)
    out = [file_line()]
    while any(streams):
        stream = draw(st.sampled_from([s for s in streams if s]))
        out.append(stream.pop(0))
    return exchanges, out


@given(cassettes())
def test_interleaved_cassettes_round_trip(cassette: tuple[list[Exchange], list[str]]) -> None:
    exchanges, written = cassette
    assert read_recording(written).exchanges == tuple(exchanges)


def test_an_exchange_refuses_what_would_inject_a_header_or_break_a_replay() -> None:
    with pytest.raises(ValueError, match="response header"):
        exchange(headers=(("x-a", "1\r\nset-cookie: x"),))
    with pytest.raises(ValueError, match="exchange number"):
        exchange(0)
    with pytest.raises(ValueError, match="'end'"):
        exchange(end="done")
