"""stream.sse: the bytes of every frame the stream service sends.

The frames are parsed back with the WHATWG "Server-sent events" rules (the
same rules a browser's EventSource applies), so the tests check what a browser
would see, not only what the encoder happens to write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stream import sse


@dataclass
class Dispatched:
    id: str
    event: str
    data: str


@dataclass
class Parsed:
    events: list[Dispatched]
    last_id: str
    comments: list[str]
    retry: int | None


def parse(stream: bytes) -> Parsed:
    """Interpret `stream` exactly as the WHATWG event stream interpretation does."""
    text = stream.decode("utf-8")
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[-1] == "":
        lines.pop()  # the text after the last line end is an incomplete line
    out = Parsed([], "", [], None)
    data, event, last_id = "", "", ""
    for line in lines:
        if line == "":
            out.last_id = last_id
            if data == "":
                event = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            out.events.append(Dispatched(last_id, event or "message", data))
            data, event = "", ""
            continue
        if line.startswith(":"):
            out.comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            out.retry = int(value)
    return out


def normalise(text: str) -> str:
    return re.sub(r"\r\n|\r", "\n", text)


def test_single_line_frame_is_one_data_line_and_a_blank_line() -> None:
    assert sse.frame(b'{"a":1}') == b'data: {"a":1}\n\n'
    (event,) = parse(sse.frame(b'{"a":1}')).events
    assert event == Dispatched("", "message", '{"a":1}')


def test_frame_with_id_and_event_puts_them_before_the_data() -> None:
    framed = sse.frame(b"1", event=b"tick", id=b"0123456789ab-7")
    assert framed == b"id: 0123456789ab-7\nevent: tick\ndata: 1\n\n"
    assert framed.endswith(b"\n\n")
    parsed = parse(framed)
    assert parsed.events == [Dispatched("0123456789ab-7", "tick", "1")]
    assert parsed.last_id == "0123456789ab-7"


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"a\nb", [b"a", b"b"]),
        (b"a\rb", [b"a", b"b"]),
        (b"a\r\nb", [b"a", b"b"]),
        (b"a\n\nb", [b"a", b"", b"b"]),
        (b"a\r\n\rb\n", [b"a", b"", b"b", b""]),
        (b"\n", [b"", b""]),
    ],
)
def test_every_line_end_starts_a_new_data_line(data: bytes, lines: list[bytes]) -> None:
    framed = sse.frame(data)
    assert framed == b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    # No raw CR survives anywhere: it would end the line for the browser.
    assert b"\r" not in framed
    (event,) = parse(framed).events
    assert event.data == normalise(data.decode())


def test_a_data_line_that_looks_like_a_field_stays_data() -> None:
    data = b"x\nid: evil\nevent: evil\n\ndata: y"
    parsed = parse(sse.frame(data, id=b"good-1"))
    assert parsed.events == [Dispatched("good-1", "message", data.decode())]
    assert parsed.last_id == "good-1"


def test_leading_space_of_a_data_line_is_kept() -> None:
    (event,) = parse(sse.frame(b" indented\n  twice")).events
    assert event.data == " indented\n  twice"


def test_unicode_data_is_passed_through_as_utf8_bytes() -> None:
    text = "héllo ✓ 🚀 \u2028 \u0085 ünïcödé"
    framed = sse.frame(text.encode("utf-8"))
    assert framed == b"data: " + text.encode("utf-8") + b"\n\n"
    (event,) = parse(framed).events
    # U+2028 and U+0085 are not line ends for SSE: the value is one line.
    assert event.data == text


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_any_text_round_trips_with_line_ends_normalised(text: str) -> None:
    framed = sse.frame(text.encode("utf-8"), event=b"e", id=b"0123456789ab-1")
    assert framed.endswith(b"\n\n")
    assert b"\r" not in framed
    (event,) = parse(framed).events
    assert event == Dispatched("0123456789ab-1", "e", normalise(text))


@pytest.mark.parametrize("bad", [b"a\rb", b"a\nb", b"a\x00b", b"\r", b"\n", b"\x00", b"end\r\n"])
def test_id_with_cr_lf_or_nul_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match="id"):
        sse.frame(b"1", id=bad)
    with pytest.raises(ValueError, match="id"):
        sse.position(bad)


@pytest.mark.parametrize("bad", [b"a\rb", b"a\nb", b"a\x00b", b"\r", b"\n", b"\x00"])
def test_event_with_cr_lf_or_nul_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError, match="event"):
        sse.frame(b"1", event=bad)


def test_nul_in_data_is_allowed_and_kept() -> None:
    (event,) = parse(sse.frame(b"a\x00b")).events
    assert event.data == "a\x00b"


def test_comment_frames() -> None:
    assert sse.comment(b"hb") == b": hb\n\n"
    assert sse.comment() == b":\n\n"
    parsed = parse(sse.comment(b"hb") + sse.comment())
    assert parsed.events == []
    assert parsed.comments == [" hb", ""]
    for bad in (b"a\rb", b"a\nb", b"a\x00b"):
        with pytest.raises(ValueError, match="comment"):
            sse.comment(bad)


def test_retry_frame() -> None:
    assert sse.retry(3000) == b"retry: 3000\n\n"
    assert sse.retry(0) == b"retry: 0\n\n"
    assert parse(sse.retry(1500)).retry == 1500
    assert parse(sse.retry(1500)).events == []
    with pytest.raises(ValueError):
        sse.retry(-1)


def test_position_frame_moves_the_last_id_without_an_event() -> None:
    framed = sse.position(b"0123456789ab-42")
    assert framed == b"id: 0123456789ab-42\n\n"
    parsed = parse(framed)
    assert parsed.events == []
    assert parsed.last_id == "0123456789ab-42"


def test_data_lines_helper() -> None:
    assert sse.data_lines(b"x") == b"data: x\n"
    assert sse.data_lines(b"") == b"data: \n"
    assert sse.data_lines(b"a\r\nb") == b"data: a\ndata: b\n"


def test_empty_data_is_still_dispatched() -> None:
    # "data: \n" fills the browser's buffer with one LF, so the event fires with "".
    (event,) = parse(sse.frame(b"", event=b"ping")).events
    assert event == Dispatched("", "ping", "")


def test_a_sequence_of_frames_gives_each_event_in_order() -> None:
    stream = (
        sse.comment(b"ok")
        + sse.retry(3000)
        + sse.position(b"0123456789ab-1")
        + sse.frame(b"1", event=b"a", id=b"0123456789ab-2")
        + sse.comment(b"hb")
        + sse.frame(b"2\n3", id=b"0123456789ab-3")
    )
    parsed = parse(stream)
    assert parsed.events == [
        Dispatched("0123456789ab-2", "a", "1"),
        Dispatched("0123456789ab-3", "message", "2\n3"),
    ]
    assert parsed.retry == 3000
    assert parsed.last_id == "0123456789ab-3"
