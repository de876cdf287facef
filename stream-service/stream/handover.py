"""The handover: a stream's connection goes from the server to its writer.

gunicorn's gevent worker gives each request a greenlet, and a greenlet that
waits costs about 8-9 KB. Once a stream's headers are decided the greenlet has
nothing left to do, so the WSGI wrapper (`init_app`) captures the status and
headers Flask produced, builds the response head and hands the connection to
the stream's `SocketWriter` (`StreamBody.hand_over`); then it tells gunicorn the
request was handled (stream/server.py) and the greenlet ends. Elsewhere (a
server without the handover, the tests) the body is iterated as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request

from . import server
from .core import Unavailable
from .hub import Hub
from .records import Replay, Stream, StreamState
from .writer import Limits, SocketWriter, YieldingWriter

BODY_KEY = "herald.stream_body"  # environ key: the stream body of this request
MIMETYPE = "text/event-stream"


class StreamBody:
    """The body of a stream's response.

    Under gunicorn's gevent worker the response is handed over (`hand_over`,
    from the WSGI wrapper below): the stream's writer takes the connection and
    the request's greenlet ends. Elsewhere the body is iterated as usual and
    yields what a `YieldingWriter` collects. Either way the stream leaves the
    hub exactly once: when its writer ends it, or when the server closes a body
    that was never handed over.
    """

    def __init__(self, hub: Hub, stream: Stream, replay: dict[int, Replay] | None, limits: Limits) -> None:
        self._hub = hub
        self._stream = stream
        self._replay = replay
        self._limits = limits
        self._handed_over = False
        self._frames: Iterator[bytes] | None = None

    def _on_end(self, reason: str) -> None:
        self._hub.leave(self._stream, reason)

    def hand_over(self, sock: Any, head: bytes, chunked: bool) -> None:
        """Give the connection to the stream's writer, which writes `head` first."""
        self._handed_over = True
        writer = SocketWriter(sock, chunked=chunked, limits=self._limits, on_end=self._on_end)
        self._stream.writer = writer
        try:
            first = self._hub.go_live(self._stream, self._replay)
            writer.start(head, first)
            self._catch_up(writer)
        except BaseException:
            self._hub.leave(self._stream)  # which ends the writer
            raise
        if self._stream.state is StreamState.CLOSED:
            writer.end()  # it ended while catching up

    def _catch_up(self, writer: SocketWriter) -> None:
        """Page by page from history until the stream is live, each page once the
        last is written out: a stream holds one page however long its gap."""
        stream = self._stream
        while stream.state is StreamState.CATCHING_UP:
            if not writer.wait_drained(self._limits.grace):
                if not writer.ended:  # else its end is on the way
                    self._hub.leave(stream, "slow")
                return
            try:
                page = self._hub.next_page(stream)
            except Unavailable:
                return  # it left: the client resumes from the last event it got
            writer.send_page(page)

    def __iter__(self) -> Iterator[bytes]:
        if self._frames is None:
            writer = YieldingWriter(limits=self._limits, on_end=self._on_end)
            self._stream.writer = writer
            first = self._hub.go_live(self._stream, self._replay)
            if self._stream.state is StreamState.CLOSED:
                writer.end()
            self._frames = self._yield(first, writer)
        return self._frames

    def _yield(self, first: bytes, writer: YieldingWriter) -> Iterator[bytes]:
        yield first
        # The server asks for the next page once it wrote the last one.
        while self._stream.state is StreamState.CATCHING_UP:
            try:
                page = self._hub.next_page(self._stream)
            except Unavailable:
                return
            if page:
                yield page
        yield from writer.frames()

    def close(self) -> None:
        """The server is done with the body: the stream leaves, unless handed over."""
        if self._handed_over:
            return
        if self._frames is not None:
            self._frames.close()  # type: ignore[attr-defined]
        self._hub.leave(self._stream)  # which ends the writer


def respond(body: StreamBody, headers: dict[str, str]) -> Response:
    """The response of a stream, marked for the WSGI wrapper to hand over."""
    request.environ[BODY_KEY] = body
    return Response(body, mimetype=MIMETYPE, headers=headers)


def response_head(status: str, headers: list[tuple[str, str]], chunked: bool) -> bytes:
    """The status line and headers of a handed-over stream response."""
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    # The stream's end is the connection's: nothing else is served on it.
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def init_app(app: Flask) -> None:
    """Hand stream responses over, once the server says it honours that
    (`server.HANDOVER`, which `server.post_worker_init` turns on in gevent workers)."""
    app.config[server.HANDOVER] = False
    app.wsgi_app = wrap(app.wsgi_app, lambda: app.config[server.HANDOVER])  # type: ignore[method-assign]


def wrap(wsgi_app: Callable[..., Any], enabled: Callable[[], bool]) -> Callable[..., Any]:
    """WSGI wrapper: a stream response under gunicorn's gevent worker is handed to
    its writer, and gunicorn is told it was handled (no greenlet stays per stream).

    `enabled` says whether the server honours that.
    """

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = environ.get(server.SOCKET_KEY)
        if sock is None or not enabled():
            return wsgi_app(environ, start_response)
        started: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started[:] = [status, headers, exc_info]
            return lambda data: None  # the WSGI write() callable, unused by Flask

        body = wsgi_app(environ, capture)
        stream_body = environ.get(BODY_KEY)
        if isinstance(stream_body, StreamBody) and started and started[0].startswith("200"):
            chunked = environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
            stream_body.hand_over(sock, response_head(started[0], started[1], chunked), chunked)
            if hasattr(body, "close"):
                body.close()  # WSGI etiquette; the handed-over body ignores it
            return server.ALREADY_HANDLED
        start_response(*started)
        return body

    return app
