"""One connected SSE client: a bounded buffer of encoded frames.

The hub pushes frames; the client's own greenlet takes them all at once and
writes them in one chunk. A client whose buffer outgrows its byte limit is
disconnected (it comes back with its Last-Event-ID), so memory stays bounded
however slow a client is.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Iterable

import gevent
from gevent.event import Event
from greenlet import greenlet

# A frame that is not an event (a reset): always delivered, and it lets the
# events after it through whatever their sequence number (a new epoch).
CONTROL = -1


class Subscriber:
    """A client's channels, its buffer of (seq, frame) items, and its state."""

    __slots__ = ("_bytes", "_items", "_limit", "_wakeup", "channels", "closed", "owner")

    def __init__(self, channels: Iterable[str], limit_bytes: int, owner: greenlet | None = None) -> None:
        self.channels = tuple(channels)
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._limit = limit_bytes
        self._wakeup = Event()
        # The greenlet writing this client's response, once streaming has begun.
        self.owner: greenlet | None = None
        self.closed: str | None = None  # why the stream must end, once it must

    def push(self, seq: int, frame: bytes) -> bool:
        """Queue a frame; False if this frame put the client too far behind (dropped)."""
        if self.closed:
            return True  # already ending; nothing more to count
        self._items.append((seq, frame))
        self._bytes += len(frame)
        if self._bytes > self._limit:
            self.close("slow", cut=True)
            return False
        self._wakeup.set()
        return True

    def take(self, timeout: float) -> list[tuple[int, bytes]]:
        """Everything queued, waiting up to `timeout` s for something; [] on timeout."""
        if not self._items and not self.closed:
            self._wakeup.clear()
            self._wakeup.wait(timeout)
        items = list(self._items)
        self._items.clear()
        self._bytes = 0
        return items

    def close(self, reason: str, *, cut: bool = False) -> None:
        """End the stream. With `cut`, also abort the client's greenlet.

        Cutting is for a client that does not read: its greenlet may be blocked
        writing to a full socket forever. It gets a broken pipe, which gunicorn
        treats as a vanished client: it closes the connection without noise.
        """
        if self.closed:
            return
        self.closed = reason
        self._items.clear()
        self._bytes = 0
        self._wakeup.set()
        if cut and self.owner is not None and self.owner is not gevent.getcurrent():
            gevent.kill(self.owner, BrokenPipeError(errno.EPIPE, f"client dropped: {reason}"))
