"""A small SSE client for tests: one thread per stream, parsed by tests.support.sse.

It records every event with its id, type and data, the last event id (id-only
frames included), comments, and how the stream ended, so tests can assert on
exactly what a browser would have seen.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from tests.support.sse import Event, SSEParser, unwrap


def stream_url(base: str, channels: list[str], last_event_id: str | None = None) -> str:
    params: list[tuple[str, str]] = [("channel", c) for c in channels]
    if last_event_id:
        params.append(("lastEventId", last_event_id))
    return f"{base}/stream?{urlencode(params)}"


@dataclass
class SSEClient:
    """Reads one stream in a background thread."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_id: str = ""
    ended: str | None = None  # "eof", "error: ...", "closed"
    body: bytes = b""
    raw: bytearray = field(default_factory=bytearray)
    channels: list[str] = field(default_factory=list)  # to unwrap a multi-channel stream's events

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float = 10) -> SSEClient:
        """Connect and wait until the status line and headers arrived."""
        self._thread.start()
        self.wait_for(lambda: self.status is not None or self.ended is not None, timeout)
        return self

    def _run(self) -> None:
        parts = urlsplit(self.url)
        try:
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
            self._conn = conn
            conn.request(
                "GET", f"{parts.path}?{parts.query}", headers={"Accept": "text/event-stream", **self.headers}
            )
            # http.client hands the socket to the response (and forgets it) when
            # the answer says `Connection: close`, as a stream's does.
            self._sock = conn.sock
            response = conn.getresponse()
            with self._cond:
                self.response_headers = {k.lower(): v for k, v in response.getheaders()}
                self.status = response.status
                self._cond.notify_all()
            if response.status != 200:
                self.body = response.read()
                self._end("eof")
                return
            self._parse(response)
            self._end("eof")
        except Exception as exc:  # the tests look at `ended`
            self._end(f"error: {exc!r}")

    def _parse(self, response: http.client.HTTPResponse) -> None:
        parser = SSEParser()
        # readline, not read1: http.client's read1 of a chunked body can fail
        # mid-stream with IncompleteRead; the parser takes the bytes in any split.
        while chunk := response.readline():
            frames = parser.feed(chunk)
            with self._cond:
                self.raw += chunk
                for frame in frames:
                    self.comments.extend(frame.comments)
                    if frame.event is not None:
                        self.events.append(unwrap(frame.event, self.channels))
                self.last_id = parser.last_event_id
                self.retry = parser.retry
                self._cond.notify_all()

    def _end(self, how: str) -> None:
        with self._cond:
            if self.ended is None:
                self.ended = how
            self._cond.notify_all()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10) -> bool:
        """Wait on a monotonic deadline until `condition()` holds; return whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def wait_events(self, count: int, timeout: float = 10) -> list[Event]:
        """Wait until at least `count` events arrived; fail the test otherwise."""
        if not self.wait_for(lambda: len(self.events) >= count or self.ended is not None, timeout):
            raise AssertionError(f"got {len(self.events)} of {count} events after {timeout} s")
        if len(self.events) < count:
            raise AssertionError(f"stream ended ({self.ended}) after {len(self.events)} of {count} events")
        return list(self.events)

    def close(self) -> None:
        """Hang up abruptly, like a closed browser tab."""
        conn, sock = self._conn, self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
        if conn is not None:
            conn.close()
        self._thread.join(5)
        self._end("closed")


def open_stream(
    base: str,
    channels: list[str],
    last_event_id: str | None = None,
    *,
    header_id: str | None = None,
    timeout: float = 10,
) -> SSEClient:
    """Open a stream and wait until it is live (its first frames have arrived)."""
    headers = {"Last-Event-ID": header_id} if header_id else {}
    url = stream_url(base, channels, last_event_id)
    client = SSEClient(url, headers, channels=list(channels)).start(timeout)
    if client.status == 200:
        # The service sends a comment and retry first, then the position or replay.
        client.wait_for(lambda: client.retry is not None or client.ended is not None, timeout)
    return client
