"""The stream service: `GET /stream` turns Redis subscriptions into Server-Sent Events."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import logs, metrics, sse
from .auth import AccessDenied, authorize, find_token
from .config import Config
from .history import BadEventId, History, Position
from .hub import Full, Hub, Unavailable, event_frame, reset_epoch, reset_frame
from .subscriber import CONTROL, RAW, Subscriber, chunk

log = logging.getLogger("herald.stream")

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
HEARTBEAT = sse.comment(b"hb")
TOKEN_EXPIRED = sse.frame(json.dumps({"reason": "token_expired"}).encode(), event=b"token_expired")
HISTORY_CHUNK_BYTES = 65536


class BadRequest(Exception):
    """A stream request refused before the stream starts."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer: `{"error": code, "message": message}`."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def parse_channels(values: list[str], limit: int) -> list[str]:
    """The requested channels, validated and de-duplicated in order."""
    if not values:
        raise BadRequest("missing_channel", "give at least one channel: /stream?channel=<name>")
    channels = list(dict.fromkeys(values))
    if len(channels) > limit:
        raise BadRequest("too_many_channels", f"at most {limit} channels per stream, got {len(channels)}")
    for channel in channels:
        if not CHANNEL_RE.fullmatch(channel):
            raise BadRequest("invalid_channel", "a channel is 1-128 characters of A-Z a-z 0-9 _ . : -")
    return channels


def parse_last_event_id() -> Position | None:
    """The resume point: the Last-Event-ID header (reconnects), else ?lastEventId=."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        raw = request.args.get("lastEventId")
    if raw is None or not raw.strip():
        return None
    try:
        return Position.parse(raw)
    except BadEventId as exc:
        raise BadRequest("invalid_last_event_id", str(exc)) from None


def watch_disconnect(sock: socket.socket | None, sub: Subscriber) -> Any:
    """Close `sub` as soon as its peer hangs up, without waiting for a failed write.

    An SSE client sends nothing after its request, so the socket becomes
    readable only when the peer closes it (EOF).
    """
    if sock is None:
        return None
    watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
    # The plain socket under gevent's wrapper: this runs in the event loop, where
    # nothing may wait, so peek without gevent's wait-and-retry.
    raw = getattr(sock, "_sock", sock)

    def readable() -> None:
        try:
            peeked = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            peeked = b""
        watcher.stop()
        if not peeked:
            sub.close("gone")

    watcher.start(readable)
    return watcher


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """CORS for EventSource: exact origins get credentials (withCredentials), `*` never does."""
    if not origin:
        return {}
    if origin in allowed:
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    return {}


class Body:
    """A stream's response body: the frames of `frames`, and `on_close` run exactly
    once when the server closes the body, even one it never started to read
    (a generator's own `finally` does not run then)."""

    def __init__(self, frames: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._frames = frames
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            self._frames.close()  # type: ignore[attr-defined]
        finally:
            if on_close is not None:
                on_close()


class Streamer:
    """Opens streams: attach to the hub, replay what the client missed, then go live."""

    def __init__(self, config: Config, hub: Hub, history: History) -> None:
        self._config = config
        self._hub = hub
        self._history = history
        self._preamble = sse.comment(b"ok") + sse.retry(config.retry_ms)

    def open(self, channels: list[str], last: Position | None, expires: float | None) -> Iterator[bytes]:
        """Start a stream, or raise Unavailable; the result is the response body."""
        sock = request.environ.get("gunicorn.socket")
        sub = Subscriber(channels, self._config.client_buffer_bytes)
        if sock is not None:
            # Under gunicorn the hub may write to the plain socket directly (the
            # fast path, see Subscriber); gunicorn chunks HTTP/1.1 responses.
            sub.sock = getattr(sock, "_sock", None)
            sub.chunked = request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        start, not_live = self._hub.attach(sub)
        # From here on the stream is attached: whatever fails, it is detached
        # (here, or by the body's close(), which the server calls in every case).
        try:
            head, replay, floor, epoch = self._catch_up(sub, start, last, not_live)
            watcher = watch_disconnect(sock, sub)
            body = self._body(sub, head, replay, (epoch, floor), watcher, sock, expires)
        except redis.RedisError as exc:
            self._hub.detach(sub)
            raise Unavailable(f"history could not be read: {exc}") from exc
        except BaseException:
            self._hub.detach(sub)
            raise
        return Body(body, lambda: self._hub.detach(sub))

    def _catch_up(
        self, sub: Subscriber, start: Position, last: Position | None, not_live: bool
    ) -> tuple[bytes, list[bytes], int, bytes]:
        """The first frame, the replayed frames, and the position (seq, epoch) they reach."""
        channels = list(sub.channels)
        if last is None:
            # A fresh stream starts at the hub's position. The id-only frame lets the
            # browser resume from there even if the stream drops before any event.
            head, after, check = sse.position(str(start).encode()), start, False
            if not not_live:
                return head, [], start.seq, start.epoch.encode()
        else:
            head, after, check = b"", last, True
            self._hub.note_resume()
        replay = self._history.read(channels, after, check=check)
        epoch = replay.epoch.encode()
        if replay.reset:
            self._hub.note_resets(replay.reset)
            continue_at = Position(replay.epoch, replay.seq)
            return reset_frame(replay.reset, continue_at), [], replay.seq, epoch
        frames = [event_frame(epoch, str(e.seq).encode(), e.event, e.data) for e in replay.events]
        floor = replay.events[-1].seq if replay.events else after.seq
        return head, frames, max(floor, after.seq), epoch

    def _body(
        self,
        sub: Subscriber,
        head: bytes,
        replay: list[bytes],
        position: tuple[bytes, int],
        watcher: Any,
        sock: socket.socket | None,
        expires: float | None,
    ) -> Iterator[bytes]:
        sub.owner = gevent.getcurrent()
        try:
            yield self._preamble + head
            chunk: list[bytes] = []
            size = 0
            for frame in replay:
                chunk.append(frame)
                size += len(frame)
                if size >= HISTORY_CHUNK_BYTES:
                    yield b"".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield b"".join(chunk)
            if sock is not None and sub.sock is not None:
                self._live_direct(sub, sock, position, expires)
            else:
                yield from self._live(sub, position, expires)
            # The stream ended on our side (shutdown): the body ends cleanly, and
            # the connection must not be kept alive for another request to a
            # worker that is stopping. EOF on the read side makes gunicorn close it.
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
        finally:
            # The stream is detached by Body.close(), which runs after this.
            if watcher is not None:
                watcher.stop()

    def _live(self, sub: Subscriber, position: tuple[bytes, int], expires: float | None) -> Iterator[bytes]:
        """Live events until the stream ends, written through gunicorn (yielded)."""
        epoch, last = position
        while True:
            items = sub.take(self._wait(expires))
            if sub.closed:
                return
            if not items:
                yield self._idle_frame(expires)
                if expires is not None and time.time() >= expires:
                    return
                continue
            _, frames, epoch, last = select(items, epoch, last)
            if frames:
                yield b"".join(frames)

    def _live_direct(
        self, sub: Subscriber, sock: socket.socket, position: tuple[bytes, int], expires: float | None
    ) -> None:
        """Live events until the stream ends, written to the socket itself.

        gunicorn has written the headers and every chunk yielded so far; from here
        the hub writes events straight to the socket while this greenlet sleeps,
        and this greenlet writes only what the hub had to queue, and heartbeats.
        """
        frame_out = chunk if sub.chunked else bytes
        epoch, last = position
        sub.last = last
        sub.direct = True
        while True:
            # Heartbeats come from the hub's timer while on the fast path.
            items = sub.take(None if expires is None else self._wait(expires))
            if sub.closed:
                return
            sub.direct = False  # this greenlet writes now; the hub queues meanwhile
            if not items:
                sock.sendall(frame_out(self._idle_frame(expires)))
                if expires is not None and time.time() >= expires:
                    return
            else:
                prefix, frames, epoch, last = select(items, epoch, last)
                sub.last = last
                sock.sendall(prefix + (frame_out(b"".join(frames)) if frames else b""))
            sub.direct = not sub.pending and not sub.closed

    def _wait(self, expires: float | None) -> float:
        if expires is None:
            return self._config.heartbeat_seconds
        return max(0.0, min(self._config.heartbeat_seconds, expires - time.time()))

    @staticmethod
    def _idle_frame(expires: float | None) -> bytes:
        """A heartbeat, or, once the subscribe token has run out, the notice of it."""
        if expires is not None and time.time() >= expires:
            return TOKEN_EXPIRED
        return HEARTBEAT


def select(items: list[tuple[int, bytes]], epoch: bytes, last: int) -> tuple[bytes, list[bytes], bytes, int]:
    """What of the queued items goes to the client, in order, and the position after.

    Returns the raw prefix (the rest of a partial direct write), the frames to
    send, and the new (epoch, last seq): events at or below the client's
    position were already sent (during catch-up) and are skipped.
    """
    prefix = b""
    frames = []
    for seq, frame in items:
        if seq > last:
            frames.append(frame)
            last = seq
        elif seq == RAW:
            prefix += frame
        elif seq == CONTROL and reset_epoch(frame) != epoch:
            # A new epoch: its numbers start again. (A client that already reset
            # to it while catching up skips the hub's reset.)
            frames.append(frame)
            epoch, last = reset_epoch(frame), CONTROL
    return prefix, frames, epoch, last


def create_app(config: Config | None = None) -> Flask:
    """Build the stream app. The hub connects to Redis on first use, after the fork."""
    config = config or Config.from_env()
    app = Flask(__name__)
    logs.init_app(app)
    metrics.init_app(app)
    commands = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.redis_pool_size,
            timeout=config.subscribe_timeout_seconds,
            socket_timeout=config.subscribe_timeout_seconds,
            socket_connect_timeout=config.subscribe_timeout_seconds,
        )
    )
    history = History(commands)
    hub = Hub(config, commands, history)
    streamer = Streamer(config, hub, history)
    app.extensions["herald.hub"] = hub
    unavailable = {"Retry-After": str(config.retry_after_seconds)}

    # Only GET opens a stream. Flask answers HEAD for every GET route by running
    # the view; HEAD gets the headers a GET would get and never attaches a
    # subscriber. OPTIONS is not answered automatically (EventSource never sends
    # a preflight): every other method gets a JSON 405 with `Allow: GET, HEAD`.
    @app.route("/stream", methods=["GET"], provide_automatic_options=False)
    def stream() -> Response:
        try:
            channels = parse_channels(request.args.getlist("channel"), config.max_channels_per_stream)
            last = parse_last_event_id()
        except BadRequest as exc:
            return error(400, exc.code, exc.message)
        token = find_token(
            request.headers.get("Authorization"), request.cookies, request.args, config.token_cookie
        )
        try:
            grant = authorize(channels, token, prefix=config.private_prefix, secret=config.subscribe_secret)
        except AccessDenied as exc:
            challenge = {"WWW-Authenticate": 'Bearer realm="herald"'} if exc.status == 401 else {}
            return error(exc.status, exc.code, exc.message, challenge)
        headers = {
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **cors_headers(request.headers.get("Origin"), config.cors_origins),
        }
        if request.method == "HEAD":
            if hub.clients >= config.max_connections:
                return error(503, "too_many_connections", str(Full()), unavailable)
            # An empty iterable, not b"": no Content-Length of 0 (a GET has none).
            return Response(iter(()), mimetype="text/event-stream", headers=headers)
        try:
            body = streamer.open(channels, last, grant.expires)
        except Full as exc:
            return error(503, "too_many_connections", str(exc), unavailable)
        except Unavailable as exc:
            return error(503, "unavailable", str(exc), unavailable)
        return Response(body, mimetype="text/event-stream", headers=headers)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            commands.ping()
        except redis.RedisError as exc:
            return error(503, "redis_unavailable", f"Redis is not reachable: {exc}", unavailable)
        return jsonify(status="ready")

    @app.get("/stats")
    def stats() -> Response:
        return jsonify(hub.snapshot())

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
