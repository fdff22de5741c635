"""Tests for the sans-IO SSE layer, `sserelay.wire.sse`.

Decoding rules cite the WHATWG HTML Living Standard, §9.2.5 "Parsing an event stream" and
§9.2.6 "Interpreting an event stream":
https://html.spec.whatwg.org/multipage/server-sent-events.html
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sserelay.wire.sse import (
    BlockParser,
    Event,
    SSEDecoder,
    encode_batch,
    encode_comment,
    encode_data,
    encode_event,
)

# --------------------------------------------------------------------------- helpers


def decode_chunks(chunks: Iterable[bytes]) -> list[Event]:
    """Feed `chunks` to one fresh decoder, then end the stream."""
    decoder = SSEDecoder()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.decode(chunk))
    events.extend(decoder.flush())
    return events


def decode_all(stream: bytes) -> list[Event]:
    return decode_chunks([stream])


def split_at(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[start:end] for start, end in pairwise(bounds)]


def normalize_line_ends(text: str) -> str:
    """What a client sees: SSE has no way to carry CR, so every line end decodes to LF."""
    return re.sub(r"\r\n|\r|\n", "\n", text)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("data", "wire", "decoded"),
    [
        ("a\nb", b"data: a\ndata: b\n\n", "a\nb"),
        ("a\r\nb", b"data: a\ndata: b\n\n", "a\nb"),
        ("a\rb", b"data: a\ndata: b\n\n", "a\nb"),
        ("a\r\n\rb\n", b"data: a\ndata: \ndata: b\ndata: \n\n", "a\n\nb\n"),
        ("\n", b"data: \ndata: \n\n", "\n"),
        ("", b"data: \n\n", ""),
        ("plain", b"data: plain\n\n", "plain"),
    ],
    ids=["LF", "CRLF", "CR", "mixed", "only-LF", "empty", "no-line-end"],
)
def test_encode_data_line_ends_become_data_lines_of_one_event(
    data: str, wire: bytes, decoded: str
) -> None:
    assert encode_data(data) == wire
    assert decode_all(wire) == [Event(data=decoded)]


@pytest.mark.parametrize(
    "payload",
    [
        "a\n\ndata: evil",
        "a\r\n\r\nevent: evil\r\ndata: x",
        "x\r\rid: 99\rretry: 1",
        "\n\nretry: 1\n\n",
        ": not a comment\nid\n",
    ],
)
def test_encode_data_cannot_end_the_event_early_or_inject_a_field(payload: str) -> None:
    decoder = SSEDecoder()
    events = decoder.decode(encode_data(payload, "7"))
    assert events == [Event(data=normalize_line_ends(payload), id="7")]
    assert decoder.retry is None
    assert decoder.last_event_id == "7"


def test_injection_attempt_keeps_its_lines() -> None:
    (event,) = decode_all(encode_data("a\n\ndata: evil"))
    assert event.data == "a\n\ndata: evil"
    assert event.data.split("\n") == ["a", "", "data: evil"]


@pytest.mark.parametrize(
    "fields",
    [
        {"event": "a\nb"},
        {"event": "a\rb"},
        {"event": "\r\n"},
        {"id": "1\n"},
        {"id": "\r2"},
        {"id": "a\0b"},
        {"retry": -1},
    ],
    ids=repr,
)
def test_event_refuses_field_injection(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="SSE"):
        Event(data="x", **fields)


def test_event_accepts_edge_values() -> None:
    event = Event(data="a\r\n\0b", event="", id="", retry=0)
    assert (event.data, event.event, event.id, event.retry) == ("a\r\n\0b", "", "", 0)


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        (Event("x"), b"data: x\n\n"),
        (Event("x", event="add"), b"event: add\ndata: x\n\n"),
        (Event("x", id="5"), b"id: 5\ndata: x\n\n"),
        (Event("x", retry=3000), b"retry: 3000\ndata: x\n\n"),
        (Event("", retry=0), b"retry: 0\ndata: \n\n"),
        (
            Event("a\nb", event="tick", id="1", retry=250),
            b"event: tick\nid: 1\nretry: 250\ndata: a\ndata: b\n\n",
        ),
    ],
    ids=["data", "event", "id", "retry", "retry-0-empty-data", "all"],
)
def test_encode_event_wire_form_and_round_trip(event: Event, wire: bytes) -> None:
    assert encode_event(event) == wire
    assert decode_all(wire) == [event]


@pytest.mark.parametrize(
    ("text", "wire"),
    [
        ("", b":\n"),
        ("ping", b": ping\n"),
        ("a\nb", b": a\n: b\n"),
        ("a\r\n\rb", b": a\n:\n: b\n"),
        ("data: x\n\nid: 3", b": data: x\n:\n: id: 3\n"),
    ],
)
def test_encode_comment_is_comment_lines_the_decoder_ignores(text: str, wire: bytes) -> None:
    comment = encode_comment(text)
    assert comment == wire
    assert all(line.startswith(b":") for line in comment.splitlines())
    decoder = SSEDecoder()
    assert decoder.decode(comment + b"\n") == []
    # a comment between two data lines leaves the event whole
    assert decoder.decode(b"data: a\n" + comment + b"data: b\n\n") == [Event("a\nb")]
    assert decoder.last_event_id == ""
    assert decoder.retry is None


@given(
    st.lists(st.one_of(st.text(), st.text(alphabet="ab \r\n")), max_size=8),
    st.one_of(st.none(), st.integers(min_value=0, max_value=10**12)),
    st.sampled_from(["", "1700000000000-"]),
)
def test_encode_batch_is_the_events_joined_with_their_ends(
    chunks: list[str], first_id: int | None, prefix: str
) -> None:
    payload, ends = encode_batch(chunks, first_id, prefix)
    if first_id is None:
        parts = [encode_data(chunk) for chunk in chunks]
    else:
        parts = [encode_data(chunk, f"{prefix}{first_id + i}") for i, chunk in enumerate(chunks)]
    assert payload == b"".join(parts)
    assert [payload[start:end] for start, end in pairwise([0, *ends])] == parts


@pytest.mark.parametrize(
    "chunks",
    [["plain", "ascii"], ["caf\u00e9", "x"], ["a\rb", "c"], ["a\nb"], ["\n", ""], []],
)
def test_encode_batch_fast_and_slow_paths_agree(chunks: list[str]) -> None:
    payload, ends = encode_batch(chunks, 7)
    assert payload == b"".join(encode_data(c, str(7 + i)) for i, c in enumerate(chunks))
    assert len(ends) == len(chunks) and (not ends or ends[-1] == len(payload))


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "stream",
    [
        b"data: a\ndata: b\n\ndata: c\n\n",
        b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
        b"data: a\rdata: b\r\rdata: c\r\r",
        b"data: a\rdata: b\r\n\ndata: c\n\r",
    ],
    ids=["LF", "CRLF", "CR", "mixed"],
)
def test_line_ends_lf_crlf_and_cr(stream: bytes) -> None:
    # §9.2.6: "a U+000D CARRIAGE RETURN U+000A LINE FEED (CRLF) character pair, a single
    # U+000A LINE FEED (LF) ..., and a single U+000D CARRIAGE RETURN (CR) ..."
    assert decode_all(stream) == [Event("a\nb"), Event("c")]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"\xef\xbb\xbfdata: x\n\n", [Event("x")]),
        (b"\xef\xbb\xbf\ndata: x\n\n", [Event("x")]),
        (b"\xef\xbb\xbf: comment\ndata: x\n\n", [Event("x")]),
        # only one BOM is stripped: the second makes the field name "\ufeffdata"
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", []),
        # only at stream start: later it is part of the field name
        (b"data: x\n\n\xef\xbb\xbfdata: y\n\n", [Event("x")]),
        (b"data: \xef\xbb\xbfx\n\n", [Event("\ufeffx")]),
    ],
    ids=["start", "then-blank", "then-comment", "twice", "not-at-start", "in-value"],
)
def test_leading_bom_stripped_once_at_stream_start(stream: bytes, expected: list[Event]) -> None:
    # §9.2.6: "The UTF-8 decode algorithm strips one leading UTF-8 Byte Order Mark (BOM)"
    assert decode_all(stream) == expected


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b": hello\n\n", []),
        (b":\n\n", []),
        (b":data: x\n\n", []),
        (b"data: a\n: comment\n:\n: data: b\ndata: c\n\n", [Event("a\nc")]),
        (b": id: 5\n:event: e\n:retry: 9\ndata: x\n\n", [Event("x")]),
    ],
)
def test_colon_lines_are_comments(stream: bytes, expected: list[Event]) -> None:
    # §9.2.6: "If the line starts with a U+003A COLON character (:) Ignore the line."
    assert decode_all(stream) == expected


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data\n\n", [Event("")]),
        (b"data\ndata\n\n", [Event("\n")]),
        (b"data: x\nevent\n\n", [Event("x")]),
        (b"id: 3\ndata: a\n\nid\ndata: b\n\n", [Event("a", id="3"), Event("b")]),
        (b"data \n\n", []),
    ],
    ids=["data", "data-twice", "event", "id-resets", "name-with-space"],
)
def test_field_without_colon_has_empty_value(stream: bytes, expected: list[Event]) -> None:
    # §9.2.6: "using the whole line as the field name, and the empty string as the field value"
    assert decode_all(stream) == expected


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"data:x", "x"),
        (b"data: x", "x"),
        (b"data:  x", " x"),
        (b"data:   x", "  x"),
        (b"data:\tx", "\tx"),
        (b"data: x ", "x "),
        (b"data: ", ""),
        (b"data:  ", " "),
        (b"data: a: b", "a: b"),
    ],
)
def test_exactly_one_space_after_colon_is_stripped(line: bytes, value: str) -> None:
    # §9.2.6: "If value starts with a U+0020 SPACE character, remove it from value."
    assert decode_all(line + b"\n\n") == [Event(value)]


@pytest.mark.parametrize(
    ("stream", "data"),
    [
        (b"data: a\ndata: b\n\n", "a\nb"),
        (b"data: a\ndata:\ndata: b\n\n", "a\n\nb"),
        (b"data:\ndata: a\n\n", "\na"),
        (b"data: a\ndata:\n\n", "a\n"),
        (b"data: a\nevent: e\ndata: b\n\n", "a\nb"),
    ],
)
def test_multiline_data_is_joined_by_lf(stream: bytes, data: str) -> None:
    # §9.2.6: append value then LF; at dispatch remove the one trailing LF
    assert [event.data for event in decode_all(stream)] == [data]


@pytest.mark.parametrize(
    ("value", "retry"),
    [
        (b"1000", 1000),
        (b"0", 0),
        (b"007", 7),
        (b"1a", None),
        (b" 5", None),  # "retry:  5": one space is stripped, the value is " 5"
        (b"5 ", None),
        (b"-1", None),
        (b"+1", None),
        (b"1.5", None),
        (b"1e3", None),
        ("\u0663".encode(), None),  # ARABIC-INDIC DIGIT THREE
        ("\uff15".encode(), None),  # FULLWIDTH DIGIT FIVE
        ("\u00b2".encode(), None),  # SUPERSCRIPT TWO: str.isdigit() is true for it
    ],
)
def test_retry_only_when_all_ascii_digits(value: bytes, retry: int | None) -> None:
    # §9.2.6: "If the field value consists of only ASCII digits, then interpret the field value
    # as an integer in base ten ... Otherwise, ignore the field."
    decoder = SSEDecoder()
    assert decoder.decode(b"retry: " + value + b"\ndata: x\n\n") == [Event("x", retry=retry)]
    assert decoder.retry == retry


def test_retry_is_carried_only_by_the_event_that_had_the_field() -> None:
    decoder = SSEDecoder()
    stream = b"retry: 5\ndata: a\n\ndata: b\n\nretry: 9\n\ndata: c\n\nretry: x\ndata: d\n\n"
    assert decoder.decode(stream) == [Event("a", retry=5), Event("b"), Event("c"), Event("d")]
    assert decoder.retry == 9  # the reconnection time persists; an invalid value leaves it


def test_retry_with_huge_value_does_not_crash_the_stream() -> None:
    stream = b"retry: " + b"9" * 5000 + b"\ndata: x\n\n"
    assert [event.data for event in decode_all(stream)] == ["x"]


@pytest.mark.parametrize(
    "stream",
    [
        b"foo: bar\ndata: x\n\n",
        b"DATA: no\nData: no\ndata: x\n\n",
        b"Event: no\nID: 9\nRETRY: 1\ndata: x\n\n",
        b" data: no\ndata : no\ndata: x\n\n",
        b"\0: no\ndata: x\n\n",
    ],
)
def test_unknown_fields_are_ignored(stream: bytes) -> None:
    # §9.2.6: "Otherwise The field is ignored."; "compared literally, with no case folding"
    decoder = SSEDecoder()
    assert decoder.decode(stream) == [Event("x")]
    assert (decoder.last_event_id, decoder.retry) == ("", None)


@pytest.mark.parametrize(
    ("stream", "ids", "last_event_id"),
    [
        (b"id: 1\ndata: a\n\n", ["1"], "1"),
        (b"data: a\nid: 1\n\n", ["1"], "1"),
        (b"id: 1\ndata: a\n\ndata: b\n\n", ["1", "1"], "1"),
        (b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n", ["1", "2"], "2"),
        (b"id: 1\ndata: a\n\nid\ndata: b\n\n", ["1", None], ""),
        (b"id: 1\ndata: a\n\nid:\ndata: b\n\n", ["1", None], ""),
        (b"id: 1\ndata: a\n\nid: 2\x00x\ndata: b\n\n", ["1", "1"], "1"),
        (b"id: \x00\ndata: a\n\n", [None], ""),
        (b"id: 5\n\ndata: a\n\n", ["5"], "5"),
        (b"id:  7\ndata: a\n\n", [" 7"], " 7"),
    ],
    ids=[
        "set",
        "after-data",
        "persists",
        "changes",
        "reset-no-colon",
        "reset-empty",
        "nul-ignored",
        "only-nul",
        "set-by-dataless-block",
        "one-space-stripped",
    ],
)
def test_id_persists_and_id_with_nul_is_ignored(
    stream: bytes, ids: list[str | None], last_event_id: str
) -> None:
    # §9.2.6: "If the field value does not contain U+0000 NULL, then set the last event ID
    # buffer to the field value. Otherwise, ignore the field." The buffer is never reset.
    decoder = SSEDecoder()
    assert [event.id for event in decoder.decode(stream)] == ids
    assert decoder.last_event_id == last_event_id


def test_event_type_applies_to_its_own_event_only() -> None:
    stream = b"event: add\ndata: 1\n\ndata: 2\n\nevent: a\nevent: b\ndata: 3\n\n"
    assert decode_all(stream) == [Event("1", event="add"), Event("2"), Event("3", event="b")]


def test_blank_line_dispatches_as_soon_as_it_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(b"data: a\n") == []
    assert decoder.decode(b"data: b\n") == []
    assert decoder.decode(b"\n") == [Event("a\nb")]
    assert decoder.decode(b"data: c\r") == []
    assert decoder.decode(b"\r") == [Event("c")]


@pytest.mark.parametrize(
    ("stream", "next_event"),
    [
        (b"event: x\n\n", Event("y")),
        (b"id: 1\n\n", Event("y", id="1")),
        (b"retry: 5\n\n", Event("y")),
        (b": c\n\n", Event("y")),
        (b"foo\n\n", Event("y")),
        (b"\n\n\n", Event("y")),
        (b"\r\n\r\n", Event("y")),
    ],
)
def test_empty_data_buffer_dispatches_nothing(stream: bytes, next_event: Event) -> None:
    # §9.2.6: "If the data buffer is an empty string, set the data buffer and the event type
    # buffer to the empty string and return."
    assert decode_all(stream) == []
    # the event type (and the retry flag) of the empty block do not leak into the next event
    assert decode_all(stream + b"data: y\n\n") == [next_event]


@pytest.mark.parametrize(
    "stream",
    [
        b"data: a",
        b"data: a\n",
        b"data: a\r",
        b"data: a\r\n",
        b"data: a\ndata: b\n",
        b"data: a\n\ndata: b\n",
    ],
)
def test_unterminated_last_event_is_discarded(stream: bytes) -> None:
    # §9.2.6: "If the file ends in the middle of an event, before the final empty line, the
    # incomplete event is not dispatched."
    decoder = SSEDecoder()
    events = decoder.decode(stream)
    assert events == ([Event("a")] if b"\n\n" in stream else [])
    assert decoder.flush() == []
    # flush forgot the partial event
    assert decoder.decode(b"data: z\n\n") == [Event("z")]


def test_unterminated_event_does_not_move_last_event_id() -> None:
    # §9.2.6 dispatch step 1: "Set the last event ID string of the event source to the value of
    # the last event ID buffer"; an event never dispatched never sets it, so a reconnect must
    # not resume after an id the client never received.
    decoder = SSEDecoder()
    assert decoder.decode(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [Event("a", id="1")]
    assert decoder.flush() == []
    assert decoder.last_event_id == "1"


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(
            b"data: YHOO\ndata: +2\ndata: 10\n\n",
            [Event("YHOO\n+2\n10")],
            id="stock",
        ),
        pytest.param(
            b"data: This is the first message.\n\n"
            b"data: This is the second message, it\n"
            b"data: has two lines.\n\n"
            b"data: This is the third message.\n\n",
            [
                Event("This is the first message."),
                Event("This is the second message, it\nhas two lines."),
                Event("This is the third message."),
            ],
            id="first-message",
        ),
        pytest.param(
            b"event: add\ndata: 73857293\n\n"
            b"event: remove\ndata: 2153\n\n"
            b"event: add\ndata: 113411\n\n",
            [
                Event("73857293", event="add"),
                Event("2153", event="remove"),
                Event("113411", event="add"),
            ],
            id="event-types",
        ),
        pytest.param(
            b": test stream\n\n"
            b"data: first event\nid: 1\n\n"
            b"data:second event\nid\n\n"
            b"data:  third event\n\n",
            [Event("first event", id="1"), Event("second event"), Event(" third event")],
            id="four-blocks",
        ),
        pytest.param(
            b"data\n\ndata\ndata\n\ndata:",
            [Event(""), Event("\n")],
            id="empty-and-newline-data",
        ),
        pytest.param(
            b"data:test\n\ndata: test\n\n",
            [Event("test"), Event("test")],
            id="two-identical",
        ),
    ],
)
def test_spec_example(stream: bytes, expected: list[Event]) -> None:
    assert decode_all(stream) == expected


def test_spec_example_empty_and_newline_data_with_final_blank_line() -> None:
    # "The first block fires events with the data set to the empty string, as would the last
    # block if it was followed by a blank line."
    assert decode_all(b"data\n\ndata\ndata\n\ndata:\n\n") == [Event(""), Event("\n"), Event("")]


# --------------------------------------------------------------------------- split invariance

STREAMS = [
    b"data: a\ndata: b\n\ndata: c\n\n",
    b"id: 1\r\nevent: e\r\ndata: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
    b"data: a\rdata: b\r\rretry: 10\rdata: c\r\r",
    b"data: a\r\n\rdata: b\n\r\ndata: c\r\r\n",
    b"\xef\xbb\xbfdata: \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\r\n: c\r\n\r\n",
    b"data: \xff\xc3\r\nid: 2\x00\r\ndata\r\n\r\nid\rdata: x\n\ndata: tail",
    b"data\n\ndata\ndata\n\ndata:",
]
STREAM_IDS = ["LF", "CRLF", "CR", "mixed", "BOM-utf8", "odd", "spec"]


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_streams_decode_to_events(stream: bytes) -> None:
    # guards the split tests below against comparing empty lists
    assert decode_all(stream)


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_byte_at_a_time_decodes_the_same(stream: bytes) -> None:
    assert decode_chunks(stream[i : i + 1] for i in range(len(stream))) == decode_all(stream)


@pytest.mark.parametrize("stream", STREAMS, ids=STREAM_IDS)
def test_every_split_point_decodes_the_same(stream: bytes) -> None:
    whole = decode_all(stream)
    for cut in range(len(stream) + 1):
        assert decode_chunks([stream[:cut], stream[cut:]]) == whole, cut


def inner_cuts(stream: bytes) -> st.SearchStrategy[set[int]]:
    """Distinct split points strictly inside `stream`, so no chunk is empty."""
    if len(stream) < 2:
        return st.just(set())
    return st.sets(st.integers(min_value=1, max_value=len(stream) - 1), max_size=12)


@given(stream=st.sampled_from(STREAMS), data=st.data())
def test_any_split_decodes_the_same(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(inner_cuts(stream), label="cuts")
    assert decode_chunks(split_at(stream, cuts)) == decode_all(stream)


@given(stream=st.binary(max_size=64), data=st.data())
def test_any_split_of_any_bytes_decodes_the_same(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(inner_cuts(stream), label="cuts")
    assert decode_chunks(split_at(stream, cuts)) == decode_all(stream)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\r", b"\ndata: b\r\n\r\n"], [Event("a\nb")]),
        ([b"data: a\r", b"\n", b"data: b\r", b"\n\r", b"\n"], [Event("a\nb")]),
        ([b"data: a\r\n\r", b"\ndata: b\r\n\r\n"], [Event("a"), Event("b")]),
        ([b"data: a\r", b"data: b\r\r"], [Event("a\nb")]),
        ([b"data: a\r", b"\r\n"], [Event("a")]),
        ([b"data: a\r", b"\n\n"], [Event("a")]),
    ],
    ids=["CR|LF", "CR|LF-twice", "blank-CR|LF", "lone-CR", "CR|CRLF", "CR|LF-LF"],
)
def test_cr_and_its_lf_in_different_chunks(chunks: list[bytes], expected: list[Event]) -> None:
    assert decode_chunks(chunks) == expected
    assert decode_all(b"".join(chunks)) == expected


@pytest.mark.parametrize(
    "chunks",
    [
        [b"", b"data: a\r\ndata: b\r\n\r\n"],
        [b"data: a\r\n", b"", b"data: b\r\n\r\n", b""],
        [b"data: a", b"", b"\r\ndata: b\r\n\r\n"],
        pytest.param([b"data: a\r", b"", b"\ndata: b\r\n\r\n"], id="CR|empty|LF"),
    ],
)
def test_empty_chunks_change_nothing(chunks: list[bytes]) -> None:
    assert decode_chunks(chunks) == [Event("a\nb")]


# --------------------------------------------------------------------------- round trips

# Event/id values may not hold a line end (nor NUL, for id); "" is left out because an empty
# event type means "message" and an empty id means "no id", so both decode to None.
EVENT_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), min_size=1)
EVENT_IDS = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"), min_size=1)
EVENTS = st.builds(
    Event,
    data=st.text(),
    event=st.none() | EVENT_NAMES,
    id=st.none() | EVENT_IDS,
    retry=st.none() | st.integers(min_value=0, max_value=2**53),
)


@given(st.text())
def test_encode_data_round_trip(text: str) -> None:
    # SSE carries line ends only as line ends, so \r\n and \r come back as \n: the one loss.
    decoder = SSEDecoder()
    assert decoder.decode(encode_data(text, "7")) == [Event(normalize_line_ends(text), id="7")]
    assert decoder.flush() == []


@given(st.text(st.characters(codec="utf-8", exclude_characters="\r")))
def test_encode_data_round_trip_is_exact_without_cr(text: str) -> None:
    assert decode_all(encode_data(text)) == [Event(text)]


@given(EVENTS)
def test_encode_event_round_trip(event: Event) -> None:
    expected = Event(normalize_line_ends(event.data), event.event, event.id, event.retry)
    assert decode_all(encode_event(event)) == [expected]


@given(st.lists(EVENTS, max_size=5))
def test_encoded_event_sequence_round_trip(events: list[Event]) -> None:
    expected: list[Event] = []
    last_id: str | None = None
    for event in events:
        last_id = event.id if event.id is not None else last_id  # the id persists
        expected.append(Event(normalize_line_ends(event.data), event.event, last_id, event.retry))
    assert decode_all(b"".join(encode_event(event) for event in events)) == expected


# --------------------------------------------------------------------------- invalid UTF-8


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: \xff\n\n", [Event("\ufffd")]),
        (b"data: a\xc3\n\n", [Event("a\ufffd")]),
        (b"data: \xe2\x82\n\n", [Event("\ufffd")]),
        (b"data: \xed\xa0\x80!\n\n", [Event("\ufffd\ufffd\ufffd!")]),
        (b"data: \xc0\xaf\n\n", [Event("\ufffd\ufffd")]),
        (b"id: \xfe\ndata: x\n\n", [Event("x", id="\ufffd")]),
        (b"event: \x80\ndata: x\n\n", [Event("x", event="\ufffd")]),
        (b"\xef\xbbdata: x\n\n", []),
        (b"data: \xf0\x9f\x98\n\n", [Event("\ufffd")]),
    ],
    ids=[
        "invalid-byte",
        "truncated-2",
        "truncated-3",
        "surrogate",
        "overlong",
        "in-id",
        "in-event",
        "partial-BOM",
        "truncated-4-at-line-end",
    ],
)
def test_invalid_utf8_becomes_replacement_character(stream: bytes, expected: list[Event]) -> None:
    assert decode_all(stream) == expected
    assert decode_chunks(stream[i : i + 1] for i in range(len(stream))) == expected


@given(st.binary())
def test_any_bytes_decode_without_raising(stream: bytes) -> None:
    events = decode_all(stream)
    assert all(isinstance(event.data, str) for event in events)


@pytest.mark.parametrize(
    ("chunk", "blocks"),
    [
        (b"data: x\n\n", [(None, "x")]),
        (b"data: a\ndata: b\n\ndata: \n\n", [(None, "a\nb"), (None, "")]),
        (b"event: e\ndata: {}\n\n", [("e", "{}")]),
        (b"data:  x\n\n", [(None, " x")]),
    ],
)
def test_data_blocks_reads_canonical_chunks(
    chunk: bytes, blocks: list[tuple[str | None, str]]
) -> None:
    parser = BlockParser(strict=True)
    assert parser.data_blocks(chunk) == blocks
    assert b"".join(encode_event(Event(d, e)) for e, d in blocks) == chunk
    reference = [(b.event, b.data) for b in BlockParser(strict=True).decode(chunk)]
    assert reference == blocks


@pytest.mark.parametrize(
    "chunk",
    [
        b"data: x\n",  # not at a boundary
        b"data: x\r\n\r\n",
        b"\ndata: x\n\n",
        b"data: x\n\n\n",
        b"data:x\n\n",
        b"id: 1\ndata: x\n\n",
        b"event: \ndata: x\n\n",
        b"event: e\n\n",
        b"data: x\nevent: e\n\n",
        b": c\ndata: x\n\n",
        b"data: \xff\n\n",
        b"\xef\xbb\xbfdata: x\n\n",
    ],
)
def test_data_blocks_leaves_any_other_chunk_to_decode(chunk: bytes) -> None:
    parser = BlockParser(strict=True)
    assert parser.data_blocks(chunk) is None
    assert parser.decode(chunk) == BlockParser(strict=True).decode(chunk)


def test_data_blocks_waits_for_a_boundary() -> None:
    parser = BlockParser()
    assert parser.decode(b"data: a") == []
    assert parser.data_blocks(b"\n\n") is None  # "data: a" is held: decode() completes it
    assert [b.data for b in parser.decode(b"\n\n")] == ["a"]
    assert parser.data_blocks(b"data: b\n\n") == [(None, "b")]
