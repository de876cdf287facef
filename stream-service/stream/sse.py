"""Server-Sent Events frame encoding (WHATWG HTML, "Server-sent events").

Frames are bytes, built once per event and shared by every subscriber. Field
values can never break a frame: data is split into one `data:` line per line
(CR, LF and CRLF all end a line for the browser), and CR, LF and NUL are refused
in `id` and `event`, where the browser would end the field or ignore the id.

`json_data` escapes U+2028, U+2029 and U+0085 in JSON data: browsers do not
end a line on them, but some SSE parsers do (httpx-sse before 0.4.2 split
lines with str.splitlines()), and a publisher could forge fields there.

A stream's own frames (an event's body and id, resets, heartbeats) are built
on these in frames.py.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_FORBIDDEN = re.compile(rb"[\r\n\x00]")


# UTF-8 of U+2028 LINE SEPARATOR, U+2029 PARAGRAPH SEPARATOR, U+0085 NEXT LINE,
# and their JSON escapes. In valid UTF-8 these byte pairs and triples can only
# be those characters (0xC2 and 0xE2 are lead bytes, never continuations).
_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def json_data(data: bytes) -> bytes:
    """`data`, valid JSON, with U+2028, U+2029 and U+0085 written as JSON escapes.

    In JSON those characters can only stand inside strings, where the escape
    means the same character: the data still parses to the same value."""
    if b"\xe2\x80" not in data and b"\xc2\x85" not in data:
        return data  # the common case: one or two scans, no copy
    for raw, escaped in _SEPARATORS:
        data = data.replace(raw, escaped)
    return data


def _field(name: bytes, value: bytes) -> bytes:
    if _FORBIDDEN.search(value):
        raise ValueError(f"{name.decode()} may not contain CR, LF or NUL")
    return name + b": " + value + b"\n"


def data_lines(data: bytes) -> bytes:
    """`data:` lines for `data`; a multi-line value becomes several lines."""
    if b"\n" not in data and b"\r" not in data:
        return b"data: " + data + b"\n"
    return b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data))


def frame(data: bytes, *, event: bytes | None = None, id: bytes | None = None) -> bytes:
    """One complete event: optional `id` and `event` fields, data, blank line."""
    head = b""
    if id is not None:
        head += _field(b"id", id)
    if event is not None:
        head += _field(b"event", event)
    return head + data_lines(data) + b"\n"


def position(id: bytes) -> bytes:
    """An id-only frame: it moves the browser's last event id without firing an event."""
    return _field(b"id", id) + b"\n"


def comment(text: bytes = b"") -> bytes:
    """A comment line, ignored by clients; used to flush headers and as heartbeat."""
    if _FORBIDDEN.search(text):
        raise ValueError("a comment may not contain CR, LF or NUL")
    return b": " + text + b"\n\n" if text else b":\n\n"


def retry(milliseconds: int) -> bytes:
    """The `retry:` field, the client's reconnection delay."""
    if milliseconds < 0:
        raise ValueError("retry must be a non-negative integer")
    return b"retry: " + str(int(milliseconds)).encode() + b"\n\n"
