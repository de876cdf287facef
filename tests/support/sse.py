"""The tests' one SSE parser, exact to the WHATWG rules ("Parsing an event stream").

Fed bytes as they arrive, in any split, it returns each frame (the lines up to a
blank line) with what a browser would make of it: the event it dispatches, if
any, and the stream's last event id and reconnection time. The rules that
matter for Herald's tests:

- CR, LF and CR LF all end a line (also when a CR LF is split between reads);
  a leading byte-order mark is dropped; bytes are decoded as UTF-8 with
  replacement;
- a line starting with `:` is a comment; `name: value` loses one leading space;
  a line without a colon is a field with an empty value;
- `data` lines join with LF; `event` sets the type (default `message`); an `id`
  containing NUL is ignored, any other sets the last event id, which persists
  across frames and is set even by a frame without data; `retry` counts only if
  it is ASCII digits;
- a frame without data dispatches no event; an unterminated frame at the end
  of the stream is dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One dispatched event, as `EventSource` hands it to a page."""

    id: str
    event: str
    data: str
    channel: str | None = None  # set by `unwrap` for events of a multi-channel stream

    @property
    def seq(self) -> int:
        """The sequence number of a Herald id `<epoch>-<seq>`."""
        return int(self.id.rsplit("-", 1)[1])

    def json(self) -> Any:
        return json.loads(self.data)


CONTROL_EVENTS = ("reset", "token_expired")  # Herald's own events: never wrapped


def unwrap(event: Event, channels: list[str]) -> Event:
    """An event of a multi-channel stream, whose data is `{"channel":"<c>","data":<data>}`
    (docs/api.md): the same event with the inner data, and its channel. Checked
    strictly: the wrapper must be exactly that, and name one of the stream's channels."""
    if len(set(channels)) < 2 or event.event in CONTROL_EVENTS:
        return event
    head = '{"channel":"'
    assert event.data.startswith(head) and event.data.endswith("}"), event.data
    channel, sep, rest = event.data[len(head) :].partition('","data":')
    assert sep and channel in channels, (event.data, channels)
    return Event(event.id, event.event, rest[:-1], channel)


@dataclass
class Frame:
    """One frame as sent: its comments, its fields (data lines apart), when it
    ended, and the event it dispatched (None: no data)."""

    comments: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    at: float = 0.0
    event: Event | None = None

    def __bool__(self) -> bool:
        return bool(self.comments or self.fields or self.data)


class SSEParser:
    """Incremental parser of one stream: `feed(bytes)` returns the frames it completed."""

    def __init__(self) -> None:
        self.last_event_id = ""
        self.retry: int | None = None  # milliseconds, from the last valid `retry:`
        self._pending = bytearray()  # bytes of a line not yet ended
        self._after_cr = False  # the last byte seen ended a line with CR
        self._started = False  # the byte-order mark check is done
        self._frame = Frame()
        self._id_buffer = ""

    def reconnect(self) -> None:
        """A new connection of the same client: drop what the old one left
        unfinished; keep the last event id and reconnection time (as browsers
        do, a new stream starts from the last event id seen)."""
        self._pending.clear()
        self._after_cr = False
        self._started = False
        self._frame = Frame()
        self._id_buffer = self.last_event_id

    def feed(self, chunk: bytes) -> list[Frame]:
        """Parse the next bytes; the frames they complete, in order."""
        frames: list[Frame] = []
        start = 0
        if self._after_cr and chunk[:1] == b"\n":
            start = 1  # the LF of a CR LF split between two reads
        self._after_cr = False
        while True:
            lf, cr = chunk.find(b"\n", start), chunk.find(b"\r", start)
            end = min(lf, cr) if lf >= 0 and cr >= 0 else max(lf, cr)
            if end < 0:
                break
            self._pending += chunk[start:end]
            frame = self._line(bytes(self._pending))
            self._pending.clear()
            if frame is not None:
                frames.append(frame)
            start = end + 1
            if end == cr:
                if start == len(chunk):
                    self._after_cr = True
                elif chunk[start : start + 1] == b"\n":
                    start += 1
        self._pending += chunk[start:]
        return frames

    def _line(self, raw: bytes) -> Frame | None:
        line = raw.decode("utf-8", errors="replace")
        if not self._started:
            self._started = True
            line = line.removeprefix("\ufeff")
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self._frame.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._frame.data.append(value)
            return None
        self._frame.fields[name] = value
        if name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> Frame | None:
        frame, self._frame = self._frame, Frame()
        self.last_event_id = self._id_buffer
        if not frame:
            return None
        frame.at = time.monotonic()
        if frame.data:
            kind = frame.fields.get("event") or "message"
            frame.event = Event(self.last_event_id, kind, "\n".join(frame.data))
        return frame
