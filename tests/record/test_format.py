"""The recording format (sserelay.record.format) and the recorder: pure round trips, and a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sserelay.errors import RecordingError
from sserelay.metering.tokens import get_tokenizer
from sserelay.providers.payloads import PayloadMeter
from sserelay.record.format import (
    Block,
    Chunk,
    Header,
    is_recording,
    read_recording,
    record_lines,
    split_blocks,
)
from sserelay.record.recorder import Recorder
from sserelay.streaming.relays import EventRelay

PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
HEADER = Header("POST", "/v1/chat/completions", 200, "text/event-stream")


def relayed(raw: bytes, keep_comments: bool = False) -> bytes:
    """What the proxy writes to its client for an upstream body `raw`."""
    relay = EventRelay(PayloadMeter(), get_tokenizer("whitespace"), keep_comments=keep_comments)
    return relay.decode(raw).payload


@pytest.mark.parametrize("name", sorted(p.name for p in PAYLOADS.glob("*.sse")))
def test_every_relayed_payload_file_round_trips_byte_for_byte(name: str) -> None:
    written = relayed((PAYLOADS / name).read_bytes())
    text = HEADER.line() + record_lines(0.5, written, sse=True)
    recording = read_recording(text.splitlines(keepends=True))
    assert b"".join(part.wire() for part in recording.parts) == written
    assert all(part.t == 0.5 for part in recording.parts)


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
    again = read_recording([HEADER.line(), block.line()]).parts[0]
    assert again == block


def test_a_write_of_several_blocks_is_one_line_each() -> None:
    lines = record_lines(0.25, b"data: a\n\nevent: e\ndata: b\n\n", sse=True).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"t": 0.25, "event": None, "id": None, "retry": None, "data": "a"},
        {"t": 0.25, "event": "e", "id": None, "retry": None, "data": "b"},
    ]


def test_chunks_are_text_or_base64() -> None:
    text = Chunk(0.1, b'{"done": false}\n')
    cut = Chunk(0.2, "é".encode()[:1])  # a character cut in two by the read
    assert json.loads(text.line()) == {"t": 0.1, "chunk": '{"done": false}\n'}
    assert json.loads(cut.line()) == {"t": 0.2, "chunk_base64": "ww=="}
    header = Header("POST", "/api/chat", 200, "application/x-ndjson")
    recording = read_recording([header.line(), text.line(), cut.line()])
    assert not recording.header.sse
    assert recording.parts == (text, cut)


def test_a_cut_short_last_line_is_dropped_but_not_one_in_the_middle() -> None:
    good = Block(0.1, "a").line()
    assert read_recording([HEADER.line(), good, '{"t": 0.2, "da']).parts == (Block(0.1, "a"),)
    with pytest.raises(RecordingError, match="line 2: not JSON"):
        read_recording([HEADER.line(), '{"t": 0.2, "da\n', good])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no header"),
        (['{"hello": 1}\n'], "not a sserelay recording"),
        (['{"sserelay_recording": 99}\n'], "format version 99"),
        ([HEADER.line(), '{"data": "x"}\n'], "line 2: 't' must be"),
        ([HEADER.line(), '{"t": 1, "data": "\\ud800"}\n'], "not valid Unicode"),
        ([HEADER.line(), '{"t": 1, "event": "a\\nb", "data": "x"}\n'], "line end"),
        ([HEADER.line(), '{"t": 1, "retry": -1, "data": "x"}\n'], "retry"),
        ([HEADER.line(), '{"t": 1, "chunk_base64": "!!"}\n'], "base64"),
        ([HEADER.line(), "[1]\n"], "expected a JSON object"),
    ],
)
def test_what_is_not_a_recording_is_refused_with_the_line(lines: list[str], message: str) -> None:
    with pytest.raises(RecordingError, match=message):
        read_recording(lines)


def test_is_recording_looks_at_the_first_line() -> None:
    assert is_recording(HEADER.line().encode())
    assert not is_recording(b"Hello world\n")
    assert not is_recording(b'{"model": "x"}\n')


def test_the_recorder_writes_each_part_as_it_comes(tmp_path: Path) -> None:
    now = [100.0]
    path = tmp_path / "rec.jsonl"
    recorder = Recorder(str(path), clock=lambda: now[0])
    assert recorder.claim() and not recorder.claim()  # only the first request is recorded
    now[0] = 100.2
    recorder.start(HEADER)
    recorder.write(b"data: one\n\n")
    # unbuffered: on disk before the recorder is closed
    assert read_recording(path.read_text().splitlines(keepends=True)).parts == (Block(0.2, "one"),)
    now[0] = 100.5
    recorder.write(b"data: two\n\n")
    recorder.close()
    parts = read_recording(path.read_text().splitlines(keepends=True)).parts
    assert parts == (Block(0.2, "one"), Block(0.5, "two"))
