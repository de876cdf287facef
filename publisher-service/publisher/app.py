"""The publisher: `POST /publish` validates events and stores them in Redis."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from urllib.parse import parse_qs

import redis
from flask import Flask, Response, jsonify, request
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.exceptions import HTTPException

from . import cors, logs, metrics
from .config import Config
from .guard import Guard
from .metrics import EVENTS_PUBLISHED
from .store import (
    Cluster,
    EventStore,
    Idempotency,
    KeyReused,
    NotReplicated,
    PartiallyStored,
    PartitionsMismatch,
    Standalone,
    Stored,
    Topology,
)
from .validation import CHANNEL_RE, Event, InvalidRequest, event_from_form, events_from_json, parse_json

log = logging.getLogger("herald.publisher")

JSON_TYPES = frozenset({"application/json"})
FORM_TYPE = "application/x-www-form-urlencoded"
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer: `{"error": code, "message": message}`."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def accepted_json(events: list[Stored], batch: bool) -> bytes:
    """The 202 body, byte for byte what `jsonify` makes of the same answer.

    Channels (`[A-Za-z0-9_.:-]`) and ids (hex digits, `-`, digits) need no JSON
    escaping, so the text is put together directly: compact, keys sorted, a
    final newline.
    """
    items = ",".join([f'{{"channel":"{e.channel}","id":"{e.id}"}}' for e in events])
    return (f'{{"events":[{items}]}}\n' if batch else f"{items}\n").encode()


def not_replicated(exc: NotReplicated, headers: dict[str, str]) -> Response:
    """503: stored on the primary, not confirmed by enough replicas (PUBLISH_WAIT_REPLICAS).

    The answer carries the ids: the events are in Redis and subscribers may
    have them, but a failover now could lose them.
    """
    response = jsonify(
        error="not_replicated",
        message=f"the events were stored on the primary but only {exc.acked} of {exc.wanted} "
        "replicas confirmed them in time; retry with the same Idempotency-Key to confirm "
        "them without storing them twice",
        events=[{"channel": e.channel, "id": e.id} for e in exc.published.events],
    )
    response.status_code = 503
    response.headers.update(headers)
    return response


def partially_stored(exc: PartiallyStored, headers: dict[str, str]) -> Response:
    """503: a batch over several partitions, some of them stored, then Redis failed.

    `events` names, per event of the request in order, its id if it was stored,
    else null. After a timeout (the failing partition's outcome is unknown) the
    answer is `redis_timeout`, and null means "maybe".
    """
    retry = "retry with the same Idempotency-Key to store the rest exactly once"
    if exc.unknown:
        code = "redis_timeout"
        message = (
            f"Redis did not answer in time: the events named were stored, the others may have been; {retry}"
        )
    else:
        code = "partially_stored"
        failure = (
            "was out of memory (maxmemory reached)"
            if isinstance(exc.cause, redis.exceptions.OutOfMemoryError)
            else "failed"
        )
        message = f"Redis {failure} after some of the events were stored (the ones named); {retry}"
    response = jsonify(
        error=code,
        message=message,
        events=[None if e is None else {"channel": e.channel, "id": e.id} for e in exc.events],
    )
    response.status_code = 503
    response.headers.update(headers)
    return response


def redis_full(headers: dict[str, str]) -> Response:
    """503: Redis refused the write for memory (its `maxmemory`); nothing was stored."""
    return error(
        503,
        "redis_full",
        "Redis is out of memory (maxmemory reached): nothing of this request was stored; "
        "retry later (history expires, or the operator raises REDIS_MAXMEMORY)",
        headers,
    )


def make_redis(config: Config) -> redis.Redis:
    """A Redis client for publishing.

    It retries once on a broken connection (a pooled socket left over from a
    Redis restart) but never on a timeout, where the script may already have run.
    """
    return redis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.redis_timeout_seconds,
        socket_connect_timeout=config.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


def make_topology(config: Config) -> Topology:
    """Where the partitions live: one Redis server (REDIS_URL), or a Redis Cluster
    (REDIS_MODE=cluster, REDIS_URL a seed node; reached on first use)."""
    if config.redis_mode == "cluster":
        return Cluster(config.redis_url, config.redis_timeout_seconds)
    return Standalone(make_redis(config))


class Authenticator:
    """Checks `Authorization: Bearer <token>` against the configured tokens."""

    def __init__(self, tokens: tuple[str, ...]) -> None:
        self._tokens = [t.encode() for t in tokens]

    @property
    def open(self) -> bool:
        return not self._tokens

    def allows(self, header: str | None) -> bool:
        """True if the header carries one of the tokens (constant-time compare)."""
        if self.open:
            return True
        scheme, _, given = (header or "").partition(" ")
        candidate = given.strip().encode()
        # Compare against every token so timing does not reveal which one matched.
        matches = [hmac.compare_digest(candidate, t) for t in self._tokens]
        return scheme.lower() == "bearer" and any(matches)


def idempotency(config: Config, body: bytes) -> Idempotency | None:
    """The request's Idempotency-Key with a fingerprint of what it publishes."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidRequest(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters"
        )
    digest = hashlib.sha256(request.mimetype.encode() + b"\0" + body).hexdigest()
    # Keys are per publisher: two tokens using the same key never see each other's events.
    caller = hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()[:16]
    return Idempotency(f"{caller}:{key}", digest, config.idempotency_window_seconds)


def parse_events(config: Config) -> tuple[list[Event], bool, bytes]:
    """Read the request body into validated events according to its content type."""
    # The usual header needs no parsing; anything else (parameters, case) does.
    mimetype = request.environ.get("CONTENT_TYPE")
    if mimetype not in JSON_TYPES:
        mimetype = request.mimetype
    if request.content_length is not None and request.content_length > config.max_body_bytes:
        raise InvalidRequest(
            413, "body_too_large", f"the body is over the limit of {config.max_body_bytes} bytes"
        )
    environ = request.environ
    if "wsgi.input_terminated" in environ:
        # What get_data reads from a server that ends the input itself (gunicorn)
        # when MAX_CONTENT_LENGTH is None (create_app), without werkzeug's stream
        # lookups, which cost more than the read.
        body = environ["wsgi.input"].read()
    else:
        body = request.get_data(cache=False)
    if len(body) > config.max_body_bytes:
        raise InvalidRequest(
            413, "body_too_large", f"the body is over the limit of {config.max_body_bytes} bytes"
        )
    if mimetype in JSON_TYPES:
        events, batch = events_from_json(parse_json(body), config.max_batch, config.max_event_bytes)
        return events, batch, body
    if mimetype == FORM_TYPE:
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise InvalidRequest(400, "invalid_form", "the form body is not valid UTF-8") from None
        return [event_from_form(form, config.max_event_bytes)], False, body
    raise InvalidRequest(
        415,
        "unsupported_media_type",
        "send application/json or application/x-www-form-urlencoded",
    )


def create_app(config: Config | None = None) -> Flask:
    """Build the publisher app; Redis is reached lazily, after gunicorn forks."""
    config = config or Config.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = None  # checked by parse_events, with a JSON error
    logs.init_app(app)
    metrics.init_app(app)
    guard = Guard(config.cors_origins, config.loopback_only)

    def forbidden() -> Response | None:
        """403 for a cross-site browser request, or (no token) a Host that is not loopback."""
        environ = request.environ
        if guard.cross_site(environ):
            return error(
                403,
                "cross_site",
                "this request comes from a page of another site or origin, which is not in "
                "CORS_ALLOWED_ORIGINS: refused, with a token or without",
            )
        if guard.remote_host(environ):
            return error(
                403,
                "host_not_allowed",
                "PUBLISH_TOKEN is empty, so only requests to a loopback host (localhost, "
                "127.0.0.1, [::1]) are served; set PUBLISH_TOKEN, or PUBLISH_OPEN=true to "
                "publish without a token from any host",
            )
        return None

    cors.init_app(app, config.cors_origins, forbidden)
    auth = Authenticator(config.publish_tokens)
    if auth.open and config.publish_open:
        log.warning("PUBLISH_TOKEN is empty and PUBLISH_OPEN=true: anyone who reaches /publish can publish")
    elif auth.open:
        log.warning(
            "PUBLISH_TOKEN is empty: publishing is allowed to requests for a loopback host only "
            "(localhost, 127.0.0.1, [::1])"
        )
    store = EventStore(
        make_topology(config),
        config.history_maxlen,
        config.history_ttl_seconds,
        partitions=config.partitions,
        wait_replicas=config.wait_replicas,
        wait_timeout_seconds=config.wait_timeout_seconds,
        redis_timeout_seconds=config.redis_timeout_seconds,
    )
    app.extensions["herald.store"] = store
    unavailable = {"Retry-After": str(config.retry_after_seconds)}

    @app.post("/publish")
    def publish() -> Response:
        started = time.perf_counter()
        response = handle_publish()
        metrics.publish_done(response.status_code, time.perf_counter() - started)
        return response

    def refused(action: str) -> Response | None:
        """401 unless the request carries a publish token (or publishing is open)."""
        if auth.open or auth.allows(request.headers.get("Authorization")):
            return None
        message = f"a valid bearer token is required to {action}"
        return error(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="herald"'})

    def handle_publish() -> Response:
        if (denied := forbidden() or refused("publish")) is not None:
            return denied
        try:
            events, batch, body = parse_events(config)
            once = idempotency(config, body)
        except InvalidRequest as exc:
            return error(exc.status, exc.code, exc.message)
        try:
            published = store.publish(events, once)
        except KeyReused:
            return error(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request",
            )
        except NotReplicated as exc:
            log.error("publish not replicated in time: %s", exc)
            return not_replicated(exc, unavailable)
        except PartiallyStored as exc:
            log.error("publish partially stored: %s", exc)
            return partially_stored(exc, unavailable)
        except redis.exceptions.OutOfMemoryError as exc:
            log.error("publish refused, Redis is full: %s", exc)
            return redis_full(unavailable)
        except PartitionsMismatch as exc:
            log.error("publish refused, misconfigured: %s", exc)
            return error(503, "misconfigured", str(exc), unavailable)
        except redis.TimeoutError as exc:
            # The script may have run after all (a frozen Redis resumes it later).
            log.error("publish timed out, outcome unknown: %s", exc)
            return error(
                503,
                "redis_timeout",
                "Redis did not answer in time: the events may have been stored; "
                "retry with the same Idempotency-Key to publish them exactly once",
                unavailable,
            )
        except redis.RedisError as exc:
            log.error("publish failed, Redis unavailable: %s", exc)
            if isinstance(exc, redis.exceptions.MovedError) and config.redis_mode != "cluster":
                log.error("Redis answered MOVED: REDIS_URL is a cluster node; set REDIS_MODE=cluster")
            return error(
                503, "redis_unavailable", "events cannot be stored right now; retry later", unavailable
            )
        if published.new:
            EVENTS_PUBLISHED.inc(published.new)
        response = Response(accepted_json(published.events, batch), 202, mimetype="application/json")
        if published.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    @app.get("/channels/<channel>")
    def presence(channel: str) -> Response:
        """Streams subscribed to `channel` now, over every stream replica."""
        if (denied := forbidden() or refused("read presence")) is not None:
            return denied
        if not CHANNEL_RE.fullmatch(channel):
            return error(400, "invalid_channel", "a channel is 1-128 characters of A-Z a-z 0-9 _ . : -")
        try:
            count = store.subscribers(channel)
        except redis.RedisError as exc:
            log.error("presence read failed: %s", exc)
            return error(503, "redis_unavailable", "presence cannot be read right now", unavailable)
        return jsonify(channel=channel, subscribers=count)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response | tuple[Response, int]:
        try:
            store.ping()
        except redis.RedisError as exc:
            return error(503, "redis_unavailable", f"Redis is not reachable: {exc}", unavailable)
        return jsonify(status="ready")

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
