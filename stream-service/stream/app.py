"""The stream service: `GET /stream` turns Redis subscriptions into Server-Sent Events."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from gunicorn.workers.base_async import ALREADY_HANDLED
from werkzeug.exceptions import HTTPException

from . import cors, logs, metrics, slots
from .auth import AccessDenied, Grant, authorize, find_token
from .config import Config
from .core import Full, Replay, Stream, StreamState, Unavailable
from .history import History
from .hub import Hub
from .pages import read_page
from .params import (
    MAX_HISTORY_LIMIT,
    BadRequest,
    parse_after,
    parse_channels,
    parse_last_event_id,
    parse_limit,
    refuse_repeats,
)
from .topology import Topology
from .writer import Limits, SocketWriter, YieldingWriter

log = logging.getLogger("herald.stream")

HANDOVER = "HERALD_HANDOVER"  # app.config key: the server honours the handover
BODY_KEY = "herald.stream_body"  # environ key: the stream body of this request


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer: `{"error": code, "message": message}`."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


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


def response_head(status: str, headers: list[tuple[str, str]], chunked: bool) -> bytes:
    """The status line and headers of a handed-over stream response."""
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    # The stream's end is the connection's: nothing else is served on it.
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def handover_wrapper(wsgi_app: Callable[..., Any], enabled: Callable[[], bool]) -> Callable[..., Any]:
    """WSGI wrapper: a stream response under gunicorn's gevent worker is handed to
    its writer, and gunicorn is told it was handled (no greenlet stays per stream).

    `enabled` says whether the server honours that (gunicorn.conf.py turns it on
    in gevent workers).
    """

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = environ.get("gunicorn.socket")
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
            return ALREADY_HANDLED
        start_response(*started)
        return body

    return app


def create_app(config: Config | None = None) -> Flask:
    """Build the stream app. The hub connects to Redis on first use, after the fork."""
    config = config or Config.from_env()
    app = Flask(__name__)
    logs.init_app(app)
    metrics.init_app(app)
    topology = Topology(config)
    history = History(topology.client, config.partitions)
    hub = Hub(config, history, topology)
    app.extensions["herald.hub"] = hub
    app.config[HANDOVER] = False
    app.wsgi_app = handover_wrapper(app.wsgi_app, lambda: app.config[HANDOVER])  # type: ignore[method-assign]
    unavailable = {"Retry-After": str(config.retry_after_seconds)}
    limits = Limits(config.client_buffer_bytes, config.client_buffer_max_bytes, config.client_buffer_seconds)

    # Only GET opens a stream. Flask answers HEAD for every GET route by running
    # the view; HEAD gets the headers a GET would get and never attaches a
    # subscriber. OPTIONS answers CORS preflights (stream/cors.py): a page on
    # another origin sends the token and Last-Event-ID in headers. Every other
    # method gets a JSON 405 with `Allow: GET, HEAD, OPTIONS`.
    cors.init_app(app, config.cors_origins, ("/stream", "/history"), error)
    private = {
        "prefix": config.private_prefix,
        "secret": config.subscribe_secret,
        "audience": config.subscribe_audience,
        "issuer": config.subscribe_issuer,
    }

    def access(channels: list[str]) -> Grant:
        """What the request's subscribe token grants on `channels` (AccessDenied if not enough)."""
        token = find_token(
            request.headers.get("Authorization"), request.cookies, request.args, config.token_cookie
        )
        return authorize(channels, token, **private)

    @app.route("/stream", methods=["GET"], provide_automatic_options=False)
    def stream() -> Response:
        refuse_repeats(request.args, ("lastEventId", "token"))
        channels = parse_channels(request.args.getlist("channel"), config.max_channels_per_stream)
        last = parse_last_event_id(request.headers.get("Last-Event-ID"), request.args.get("lastEventId"))
        grant = access(channels)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            if hub.clients >= config.max_connections:
                return error(503, "too_many_connections", str(Full()), unavailable)
            # An empty iterable, not b"": no Content-Length of 0 (a GET has none).
            return Response(iter(()), mimetype="text/event-stream", headers=headers)
        stream = Stream(channels, last, grant.expires)
        try:
            hub.open(stream)
            replay = hub.read_history(stream)
        except Full as exc:
            return error(503, "too_many_connections", str(exc), unavailable)
        except Unavailable as exc:
            return error(503, "unavailable", str(exc), unavailable)
        except BaseException:
            hub.leave(stream)
            raise
        body = request.environ[BODY_KEY] = StreamBody(hub, stream, replay, limits)
        return Response(body, mimetype="text/event-stream", headers=headers)

    @app.get("/history")
    def history_page() -> Response:
        """Recent or missed events as JSON, and the id to open /stream from afterwards."""
        refuse_repeats(request.args, ("after", "limit", "token"))
        channels = parse_channels(request.args.getlist("channel"), config.max_channels_per_stream)
        after = parse_after(request.args.get("after"))
        limit = parse_limit(request.args.get("limit"), MAX_HISTORY_LIMIT)
        access(channels)
        try:
            page = read_page(history, channels, config.partitions, after, limit)
        except redis.RedisError as exc:
            log.error("history read failed: %s", exc)
            return error(503, "unavailable", "history cannot be read right now", unavailable)
        response = jsonify(page.as_json())
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            topology.client().ping()
        except redis.RedisError as exc:
            return error(503, "redis_unavailable", f"Redis is not reachable: {exc}", unavailable)
        return jsonify(status="ready")

    @app.get("/stats")
    def stats() -> Response:
        # Which of nginx's sockets this replica serves (stream/slots.py), if any.
        return jsonify({**hub.snapshot(), "slot": slots.current()})

    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest) -> Response:
        return error(400, exc.code, exc.message)

    @app.errorhandler(AccessDenied)
    def access_denied(exc: AccessDenied) -> Response:
        challenge = {"WWW-Authenticate": 'Bearer realm="herald"'} if exc.status == 401 else {}
        return error(exc.status, exc.code, exc.message, challenge)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        # Keep the exception's own headers (Allow on a 405, for instance).
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error(exc.code or 500, code, exc.description or code, headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        return error(500, "internal_error", "an unexpected error occurred")

    return app
