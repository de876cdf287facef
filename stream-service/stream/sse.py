"""Server-Sent Events frame encoding (WHATWG HTML, "Server-sent events").

Frames are bytes, built once per event and shared by every subscriber. Field
values can never break a frame: data is split into one `data:` line per line
(CR, LF and CRLF all end a line for the browser), and CR, LF and NUL are refused
in `id` and `event`, where the browser would end the field or ignore the id.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_FORBIDDEN = re.compile(rb"[\r\n\x00]")


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
