"""The frames of a Herald stream, built with sse.py: an event's body, its `id:`
line, resets, the preamble, heartbeats and the token's end.

An event's body (its frame without the id line) is built once, when first
needed, and shared by every stream that gets the same bytes: as is for
single-channel streams, and with its data wrapped with its channel name for
multi-channel streams. Ids are built by the service, never taken from input.
"""

from __future__ import annotations

import json

from . import sse

PREAMBLE_COMMENT = sse.comment(b"ok")
HEARTBEAT = sse.comment(b"hb")
TOKEN_EXPIRED = sse.frame(json.dumps({"reason": "token_expired"}).encode(), event=b"token_expired")


def event_body(event: bytes, data: bytes) -> bytes:
    """An event's frame without its id line: event, data (line separators escaped), blank line."""
    return sse.frame(sse.json_data(data), event=event)


def with_id(id: bytes, body: bytes) -> bytes:
    """A frame: the `id:` line, then the body (ids are built here, never from input)."""
    return b"id: " + id + b"\n" + body


def reset_body(reason: str) -> bytes:
    """A `reset` event without its id: history cannot cover the gap."""
    return sse.frame(json.dumps({"reason": reason}).encode(), event=b"reset")


def envelope(channel: str, data: bytes) -> bytes:
    """The data of an event on a multi-channel stream: the channel, then the data."""
    return b'{"channel":"' + channel.encode() + b'","data":' + data + b"}"


class Payload:
    """One event's bodies (frames without an id line), each built once, when first needed:
    as single-channel streams get it, and wrapped with its channel for multi-channel streams."""

    __slots__ = ("_plain", "_wrapped", "channel", "data", "event")

    def __init__(self, channel: str, event: bytes, data: bytes, plain: bytes | None = None) -> None:
        self.channel, self.event, self.data = channel, event, data
        self._plain = plain
        self._wrapped: bytes | None = None

    def plain(self) -> bytes:
        if self._plain is None:
            self._plain = event_body(self.event, self.data)
        return self._plain

    def wrapped(self) -> bytes:
        if self._wrapped is None:
            self._wrapped = event_body(self.event, envelope(self.channel, self.data))
        return self._wrapped

    def body(self, wrap: bool) -> bytes:
        """The body for a stream that wraps each event with its channel, or not."""
        return self.wrapped() if wrap else self.plain()
