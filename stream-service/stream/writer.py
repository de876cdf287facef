"""One writer per stream: the only code that writes to its socket.

Under gunicorn's gevent worker a stream's connection is handed over to its
writer once the response starts (handover.py): the writer writes the response
head, the catch-up, every event and heartbeat, and the end of the response (the
last chunk, when chunked), then closes the socket. No greenlet waits per
stream: the request's greenlet ends at the handover.

Writes never wait. What the socket takes at once is written; the rest is queued
and written from the event loop as the socket drains. A slow client is one
that does not drain (`Limits`, as Redis's output-buffer limits): its queue
stays above the soft limit for longer than the grace time, or passes the hard
limit. It is cut, and comes back with its Last-Event-ID. A burst that a reader
takes in stride never cuts it, and memory stays bounded however slow a client is.
While a stream catches up, its writer gets one page of history at a time
(`send_page`), the next once the last is written out (`wait_drained`).

Elsewhere (a server without the handover, the tests) a `YieldingWriter` queues
frames for the response body to yield.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event

from .frames import HEARTBEAT
from .server import raw_socket

LAST_CHUNK = b"0\r\n\r\n"
READ, WRITE = 1, 2  # libev event masks


def chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%X\r\n%b\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Limits:
    """When a stream's client counts as slow: bytes queued for it above `soft`
    for longer than `grace` seconds, or above `hard` at any moment."""

    soft: int
    hard: int
    grace: float


class Backlog:
    """How long a writer's queue has been above the soft limit."""

    __slots__ = ("_limits", "_over_since")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._over_since: float | None = None

    def too_slow(self, queued: int, *, hard: bool = True) -> bool:
        """True if a client with `queued` bytes waiting for it is too slow (see Limits)."""
        if queued <= self._limits.soft:
            self._over_since = None
            return False
        if hard and queued > self._limits.hard:
            return True
        now = time.monotonic()
        if self._over_since is None:
            self._over_since = now
            return False
        return now - self._over_since > self._limits.grace


class SocketWriter:
    """Writes one stream's response to its socket, without ever waiting.

    `chunked` is 1 when the response is chunked (an HTTP/1.1 request), else 0;
    callers that fan one frame out to many writers pick `(plain, framed)[chunked]`.
    `on_end(reason)` runs (in its own greenlet) when the writer ends the stream
    itself: the client left, a write failed, or the client fell too far behind.
    """

    __slots__ = (
        "_backlog",
        "_keep",
        "_on_end",
        "_out",
        "_pending",
        "_pending_bytes",
        "_progress",
        "_raw",
        "_reader",
        "_sock",
        "chunked",
        "ended",
    )

    def __init__(self, sock: Any, *, chunked: bool, limits: Limits, on_end: Callable[[str], None]) -> None:
        self._sock = sock
        # The plain non-blocking socket under gevent's wrapper: written from the
        # event loop, where nothing may wait.
        self._raw = raw_socket(sock)
        self._keep: Any = None
        self._backlog = Backlog(limits)
        self._progress: Event | None = None  # set on each write, while someone waits to drain
        self._on_end = on_end
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._reader: Any = None
        self._out: Any = None
        self.chunked = int(chunked)
        self.ended: str | None = None

    def start(self, head: bytes, body: bytes) -> None:
        """Take the connection over: write the response head and the first bytes."""
        # gunicorn closes its socket object when the request's greenlet ends; a
        # socket is really closed only once its makefile() files are closed too.
        self._keep = self._sock.makefile("wb", buffering=0)
        loop = gevent.get_hub().loop
        # An SSE client sends nothing after its request: the socket turns
        # readable only when the client hangs up.
        self._reader = loop.io(self._raw.fileno(), READ)
        self._reader.start(self._readable)
        self.send(head + (chunk(body) if self.chunked and body else body), hard=False)

    def send_page(self, page: bytes) -> bool:
        """Write one page of a catch-up. The caller sends one at a time, after
        `wait_drained`, so a page is held to the grace time but not the hard limit."""
        return not page or self.send(chunk(page) if self.chunked else page, hard=False)

    def wait_drained(self, patience: float) -> bool:
        """Wait until everything queued is written out: True then; False if the
        writer ended, or no byte was written for `patience` seconds."""
        while self._pending and not self.ended:
            self._progress = progress = Event()
            try:
                if not progress.wait(patience):
                    return False
            finally:
                self._progress = None
        return not self.ended

    def send(self, data: bytes, *, hard: bool = True) -> bool:
        """Write `data` (already framed for this writer) or queue it; False if ended."""
        if self.ended:
            return False
        if not self._pending:
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._finish("gone")
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._backlog.too_slow(self._pending_bytes, hard=hard):
            self._finish("slow")
            return False
        if self._out is None:
            self._out = gevent.get_hub().loop.io(self._raw.fileno(), WRITE)
            self._out.start(self._writable)
        return True

    def send_frame(self, frame: bytes) -> bool:
        """Write one SSE frame, framed as this response needs."""
        return self.send(chunk(frame) if self.chunked else frame)

    def beat(self) -> None:
        """A heartbeat, unless bytes are still queued (the client is not idle);
        then, a client over the soft limit for the grace time is cut."""
        if not self._pending:
            self.send_frame(HEARTBEAT)
        elif self._backlog.too_slow(self._pending_bytes, hard=False):
            self._finish("slow")

    def end(self, frame: bytes = b"") -> None:
        """End the response (after `frame`, if any) and close the connection.

        For an end the core decided: on_end does not run.
        """
        if self.ended:
            return
        tail = (chunk(frame) if self.chunked and frame else frame) + (LAST_CHUNK if self.chunked else b"")
        if tail and not self._pending:
            with contextlib.suppress(OSError):
                self._raw.send(tail)  # best effort: what does not fit is dropped
        self._close("ended")

    # -- event-loop callbacks: nothing here may wait ----------------------------

    def _writable(self) -> None:
        data = b"".join(self._pending)
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            return
        except OSError:
            self._finish("gone")
            return
        rest = data[sent:]
        self._pending = [rest] if rest else []
        self._pending_bytes = len(rest)
        self._backlog.too_slow(len(rest), hard=False)  # below the soft limit: the clock stops
        if sent and self._progress is not None:
            self._progress.set()
        if not rest and self._out is not None:
            self._out.stop()
            self._out = None

    def _readable(self) -> None:
        try:
            peeked = self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""
        if peeked:
            # Bytes after the request (a confused client): stop watching, a
            # failed write will tell when it is gone.
            self._reader.stop()
            return
        self._finish("gone")

    # -- the end ------------------------------------------------------------

    def _finish(self, reason: str) -> None:
        """The writer ends the stream itself: close, then tell the hub."""
        if self.ended:
            return
        self._close(reason)
        gevent.spawn(self._on_end, reason)

    def _close(self, reason: str) -> None:
        self.ended = reason
        self._pending = []
        self._pending_bytes = 0
        if self._progress is not None:
            self._progress.set()
        for watcher in (self._reader, self._out):
            if watcher is not None:
                watcher.stop()
        self._reader = self._out = None
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        keep, self._keep = self._keep, None
        if keep is not None:
            keep.close()
        with contextlib.suppress(OSError):
            self._sock.close()


class YieldingWriter:
    """A writer for servers without the handover: frames wait in a queue for the
    response body to yield them; the server frames the response."""

    __slots__ = ("_backlog", "_items", "_on_end", "_queued", "_wakeup", "chunked", "ended")

    def __init__(self, *, limits: Limits, on_end: Callable[[str], None]) -> None:
        self._items: list[bytes] = []
        self._queued = 0
        self._backlog = Backlog(limits)
        self._on_end = on_end
        self._wakeup = Event()
        self.chunked = 0
        self.ended: str | None = None

    def send(self, data: bytes) -> bool:
        if self.ended:
            return False
        self._items.append(data)
        self._queued += len(data)
        if self._backlog.too_slow(self._queued):
            self.ended = "slow"
            self._wakeup.set()
            gevent.spawn(self._on_end, "slow")
            return False
        self._wakeup.set()
        return True

    def send_frame(self, frame: bytes) -> bool:
        return self.send(frame)

    def beat(self) -> None:
        if not self._items:
            self.send(HEARTBEAT)
        elif self._backlog.too_slow(self._queued, hard=False):
            self.ended = "slow"
            self._wakeup.set()
            gevent.spawn(self._on_end, "slow")

    def end(self, frame: bytes = b"") -> None:
        if self.ended:
            return
        if frame:
            self._items.append(frame)
        self.ended = "ended"
        self._wakeup.set()

    def frames(self) -> Iterator[bytes]:
        """What to write, as it comes, until the stream ends."""
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            items, self._items, self._queued = self._items, [], 0
            ended = self.ended  # as of these items: an end during the yield comes next round
            if ended == "slow":
                return
            if items:
                yield b"".join(items)
            if ended:
                return
