"""The recorder of `proxy --record` (sserelay.record.recorder): every exchange, each line on
disk as it comes, an existing file refused unless overwritten or appended to, no secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from sserelay.errors import ConfigError, OutputError
from sserelay.record.format import (
    Block,
    Chunk,
    Header,
    body_sha256,
    end_line,
    file_line,
)
from sserelay.record.reading import read_recording
from sserelay.record.recorder import Recorder
from sserelay.record.replay import load_recording
from sserelay.secrecy import Redactor

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"x-request-id", b"req_1")]
JSON_HEADERS = [(b"content-type", b"application/json")]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_exchange_is_recorded_interleaved_each_line_as_it_comes(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "cassette.jsonl"
    recorder = Recorder(str(path), clock=clock)
    chat = recorder.exchange("POST", "/v1/chat/completions")
    clock.now = 100.5
    models = recorder.exchange("GET", "/v1/models")
    refused = recorder.exchange("POST", "/v1/chat/completions")  # sserelay answered it: no line
    clock.now = 101.0
    chat.start(b'{"model": "m"}', 200, SSE_HEADERS)
    chat.write(b"data: one\n\n")
    # unbuffered: on disk before the recorder is closed
    (opened,) = load_recording(str(path)).exchanges
    assert opened.parts == (Block(1.0, "one"),) and opened.end is None
    clock.now = 101.25
    models.start(b"", 200, JSON_HEADERS)
    models.write(b'{"data": []}')
    models.end(complete=True)
    clock.now = 102.0
    chat.write(b"data: two\n\n")
    chat.end(complete=False)
    chat.end(complete=True)  # once
    refused.end(complete=False)  # never started: nothing
    recorder.close()

    first, second = load_recording(str(path)).exchanges
    assert (first.number, first.method, first.path, first.status) == (
        1,
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert first.body_sha256 == body_sha256(b'{"model":"m"}')
    assert first.headers == (("content-type", "text/event-stream"), ("x-request-id", "req_1"))
    assert (first.t, first.parts) == (1.0, (Block(1.0, "one"), Block(2.0, "two")))
    assert (first.end, first.ended_at) == ("cut", 2.0)
    # Its times count from its own request.
    assert (second.number, second.t, second.parts) == (2, 0.75, (Chunk(0.75, b'{"data": []}'),))
    assert second.end == "complete"
    assert recorder.exchanges == 2 and recorder.error is None
    assert len(path.read_text().splitlines()) == 8


def test_an_existing_file_is_refused_naming_it_unless_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "kept.jsonl"
    path.write_text("precious\n")
    with pytest.raises(ConfigError, match=f"{path} exists: give --force .* or --append") as info:
        Recorder(str(path))
    assert info.value.field == "record"
    assert path.read_text() == "precious\n"
    Recorder(str(path), mode="overwrite").close()
    assert path.read_text() == file_line()


def test_append_numbers_on_and_drops_a_last_line_a_crash_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "cassette.jsonl"
    first = Recorder(str(path), mode="append")  # no file yet: a new cassette
    assert first.held == 0
    first.exchange("GET", "/a").start(b"", 200, JSON_HEADERS)
    first.exchange("GET", "/b").start(b"", 200, JSON_HEADERS)
    first.close()
    with path.open("a") as file:
        file.write('{"exchange": 2, "t": 0.1, "chu')  # the crash
    second = Recorder(str(path), mode="append")
    assert second.held == 2
    third = second.exchange("GET", "/c")
    third.start(b"", 200, JSON_HEADERS)
    third.end(complete=True)
    second.close()
    recording = read_recording(path.read_text().splitlines(keepends=True))
    assert [(e.number, e.path) for e in recording.exchanges] == [(1, "/a"), (2, "/b"), (3, "/c")]
    assert path.read_text().count("sserelay_recording") == 1


def test_append_refuses_what_is_not_a_version_2_cassette(tmp_path: Path) -> None:
    old = tmp_path / "v1.jsonl"
    old.write_text(Header("GET", "/", 200, "text/plain").line())
    with pytest.raises(ConfigError, match=r"version 1 recording .*--force"):
        Recorder(str(old), mode="append")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"cannot append to .*notes\.txt: line 1: not JSON"):
        Recorder(str(text), mode="append")
    assert text.read_text() == "hello\n"


def test_append_to_an_empty_file_starts_a_cassette(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.touch()
    Recorder(str(path), mode="append").close()
    assert path.read_text() == file_line()


def test_a_file_that_cannot_be_written_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot write .*missing/x\.jsonl"):
        Recorder(str(tmp_path / "missing" / "x.jsonl"))


def test_no_secret_reaches_the_file_and_the_hash_is_left_alone(tmp_path: Path) -> None:
    secret = "sk-SECRET-1234"
    path = tmp_path / "cassette.jsonl"
    body = json.dumps({"note": secret}).encode()
    # A secret that happens to be hex: masking the whole line would garble the hash.
    hexish = body_sha256(body)[10:20]
    recorder = Recorder(str(path), redactor=Redactor([secret, hexish]))
    sse = recorder.exchange("POST", f"/v1/{secret}/chat")
    sse.start(body, 200, [*SSE_HEADERS, (b"x-echo", f"key {secret}".encode())])
    sse.write(f'data: {{"error": "bad key {secret}"}}\n\n'.encode())
    raw = recorder.exchange("POST", "/raw")
    raw.start(b"", 200, [(b"content-type", b"application/octet-stream")])
    raw.write(b"\xff" + secret.encode() + b"\xfe")  # base64 in the file: masked before
    recorder.close()
    text = path.read_text()
    assert secret not in text
    chat, octets = load_recording(str(path)).exchanges
    assert chat.path == "/v1/***/chat" and ("x-echo", "key ***") in chat.headers
    assert chat.body_sha256 == body_sha256(body)
    assert isinstance(chat.parts[0], Block) and chat.parts[0].data == '{"error": "bad key ***"}'
    assert octets.parts == (Chunk(octets.parts[0].t, b"\xff***\xfe"),)
    assert secret.encode() not in b"".join(
        base64.b64decode(json.loads(line).get("chunk_base64", "")) for line in text.splitlines()
    )


def test_headers_that_carry_credentials_are_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "cassette.jsonl"
    recorder = Recorder(str(path))
    recorded = recorder.exchange("GET", "/")
    recorded.start(
        b"",
        200,
        [
            (b"content-type", b"text/plain"),
            (b"set-cookie", b"session=abc"),
            (b"www-authenticate", b"Bearer"),
            (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        ],
    )
    recorder.close()
    (got,) = load_recording(str(path)).exchanges
    assert got.headers == (("content-type", "text/plain"),)


def test_a_failed_write_stops_the_recording_not_the_relay(tmp_path: Path) -> None:
    recorder = Recorder("/dev/full", mode="overwrite")
    assert recorder.error is not None and "No space left" in recorder.error
    recording = recorder.exchange("GET", "/")
    recording.start(b"", 200, JSON_HEADERS)
    recording.write(b"{}")
    recording.end(complete=True)
    recorder.close()


def test_end_lines_say_complete_or_cut() -> None:
    with pytest.raises(ValueError):
        end_line(1, 0.0, "done")


def test_an_exchange_no_reader_would_take_back_is_left_out_not_the_others(tmp_path: Path) -> None:
    path = tmp_path / "cassette.jsonl"
    recorder = Recorder(str(path))
    odd = recorder.exchange("GET", "/a path/with\nodd characters")  # as ASGI decodes %20, %0A
    odd.start(b"", 200, JSON_HEADERS)
    skipped = recorder.exchange("GET", "/x")
    skipped.start(b"", 1000, JSON_HEADERS)  # not an HTTP status
    skipped.write(b"{}")
    skipped.end(complete=True)
    recorder.close()
    (got,) = load_recording(str(path)).exchanges
    assert (got.number, got.path) == (1, "/a path/with\nodd characters")
    assert recorder.unrecorded == ["GET /x: not an HTTP status: 1000"]
    assert recorder.error is None
