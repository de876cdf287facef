"""The tests' SSE parser (tests/support/sse.py) against the WHATWG rules."""

from __future__ import annotations

import pytest

from tests.support.sse import Event, SSEParser


def events(*chunks: bytes) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    frames = [f for chunk in chunks for f in parser.feed(chunk)]
    return [f.event for f in frames if f.event is not None], parser


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_every_line_ending_ends_a_line(newline: bytes) -> None:
    stream = newline.join([b"id: 1", b"event: tick", b"data: a", b"data: b", b"", b""])
    got, parser = events(stream)
    assert got == [Event("1", "tick", "a\nb")]
    assert parser.last_event_id == "1"


@pytest.mark.parametrize("newline", [b"\n", b"\r", b"\r\n"])
def test_any_split_of_the_bytes_gives_the_same_events(newline: bytes) -> None:
    stream = newline.join([b": hi", b"data: x", b"", b"id: 7", b"data: y", b"", b""])
    whole, _ = events(stream)
    for cut in range(len(stream) + 1):
        assert events(stream[:cut], stream[cut:])[0] == whole, cut
    assert events(*[stream[i : i + 1] for i in range(len(stream))])[0] == whole


def test_comments_fields_and_leading_space() -> None:
    parser = SSEParser()
    (frame,) = parser.feed(b": ok\ndata:no-space\ndata:  two spaces\nfield-without-colon\n\n")
    assert frame.comments == ["ok"]
    assert frame.data == ["no-space", " two spaces"]
    assert frame.fields == {"field-without-colon": ""}
    assert frame.event == Event("", "message", "no-space\n two spaces")


def test_an_id_only_frame_sets_the_last_id_and_dispatches_nothing() -> None:
    got, parser = events(b"id: 5\n\n")
    assert got == []
    assert parser.last_event_id == "5"
    # ...and the id carries over to later events that have none.
    got, _ = events(b"id: 5\n\ndata: x\n\n")
    assert got == [Event("5", "message", "x")]


def test_an_id_with_nul_is_ignored() -> None:
    got, parser = events(b"id: 1\n\nid: 2\x003\ndata: x\n\n")
    assert got == [Event("1", "message", "x")]
    assert parser.last_event_id == "1"


def test_retry_counts_only_when_all_digits() -> None:
    _, parser = events(b"retry: 1500\n\n")
    assert parser.retry == 1500
    _, parser = events(b"retry: 1500\n\nretry: 2s\n\nretry: -1\n\n")
    assert parser.retry == 1500


def test_byte_order_mark_and_invalid_utf8() -> None:
    got, _ = events(b"\xef\xbb\xbfdata: caf\xc3\xa9 \xff\n\n")
    assert got == [Event("", "message", "café \ufffd")]


def test_an_unterminated_frame_is_dropped() -> None:
    got, _ = events(b"data: complete\n\ndata: cut off\n")
    assert got == [Event("", "message", "complete")]
