"""One connected SSE client: a bounded buffer of encoded frames, and a fast path.

The fast path: while a client is live, has nothing queued and its own greenlet
is not writing, the hub writes each event's bytes straight to the client's
socket (non-blocking) and is done: no buffer, no wake-up, no greenlet switch.
Whatever the socket does not take at once (a full socket buffer) is queued, and
the client's greenlet takes over writing until the client has caught up.

The buffer is bounded in bytes: a client that falls that far behind is dropped
(it comes back with its Last-Event-ID), so memory stays bounded however slow a
client is.
"""

from __future__ import annotations

import enum
import errno
import socket
from collections import deque
from collections.abc import Iterable

import gevent
from gevent.event import Event
from greenlet import greenlet

# A frame that is not an event (a reset): always delivered, and it lets the
# events after it through whatever their sequence number (a new epoch).
CONTROL = -1
# Bytes already framed for the socket (the rest of a partial write): written first, as is.
RAW = -2


class Push(enum.Enum):
    """What became of a frame handed to a client."""

    DELIVERED = "delivered"  # written to its socket, or queued for it while it is live
    GONE = "gone"  # the client is ending or has hung up: nothing was done
    DROPPED = "dropped"  # it put the client too far behind: the client is cut


def chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk (the response is chunked; gunicorn wrote the headers)."""
    return b"%X\r\n%b\r\n" % (len(data), data)


class Subscriber:
    """A client's channels, its buffer of (seq, frame) items, and its state."""

    __slots__ = (
        "_bytes",
        "_items",
        "_limit",
        "_wakeup",
        "channels",
        "chunked",
        "closed",
        "direct",
        "last",
        "owner",
        "sock",
    )

    def __init__(self, channels: Iterable[str], limit_bytes: int) -> None:
        self.channels = tuple(channels)
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._limit = limit_bytes
        self._wakeup = Event()
        self.closed: str | None = None  # why the stream must end, once it must
        # The greenlet writing this client's response, once streaming has begun.
        self.owner: greenlet | None = None
        # The plain non-blocking socket, once writes may bypass gunicorn.
        self.sock: socket.socket | None = None
        self.chunked = True
        # True while the hub may write to `sock` itself: live, nothing queued,
        # and the client's greenlet is not in the middle of a write.
        self.direct = False
        self.last = 0  # the last sequence number sent

    def push(self, seq: int, frame: bytes, framed: bytes | None = None) -> Push:
        """Send or queue a frame, and say what became of it.

        `framed` is `frame` as a chunk, built once by the caller for everyone.
        """
        if self.closed:
            return Push.GONE
        if self.direct and seq > self.last:
            self.last = seq
            rest = self._send((framed or chunk(frame)) if self.chunked else frame)
            if self.closed:
                return Push.GONE  # the write found the client gone
            if not rest:
                return Push.DELIVERED
            seq, frame = RAW, rest
        return self._queue(seq, frame)

    def beat(self, framed: bytes, plain: bytes) -> None:
        """A heartbeat for an idle live client, written like a direct event."""
        if self.direct and not self.closed:
            rest = self._send(framed if self.chunked else plain)
            if rest:
                self._queue(RAW, rest)

    def _send(self, data: bytes) -> bytes:
        """Write what the socket takes now, without waiting; return the rest."""
        try:
            sent = self.sock.send(data)  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close("gone")
            return b""
        return data[sent:]

    def _queue(self, seq: int, frame: bytes) -> Push:
        self.direct = False  # queued bytes go first: the client's greenlet writes them
        self._items.append((seq, frame))
        self._bytes += len(frame)
        if self._bytes > self._limit:
            self.close("slow", cut=True)
            return Push.DROPPED
        if len(self._items) == 1:
            self._wakeup.set()  # the greenlet waits only when the queue is empty
        return Push.DELIVERED

    @property
    def pending(self) -> bool:
        return bool(self._items)

    def take(self, timeout: float | None) -> list[tuple[int, bytes]]:
        """Everything queued, waiting up to `timeout` s (None: no limit); [] on timeout."""
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
        self.direct = False
        self._items.clear()
        self._bytes = 0
        self._wakeup.set()
        if cut and self.owner is not None and self.owner is not gevent.getcurrent():
            gevent.kill(self.owner, BrokenPipeError(errno.EPIPE, f"client dropped: {reason}"))
