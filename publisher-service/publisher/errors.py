# Twins: http_error() and unexpected() here and in stream-service/stream/errors.py are
# identical, so both services answer HTTP errors and crashes alike: change both
# together (tests/unit/test_conventions.py checks it).
"""The publisher's error answers: `{"error": code, "message": message}` JSON, one
handler per exception a view raises (validation, access, the store, Redis).

Redis's own errors are answered as a publish's: the other views that read
Redis (presence, the occupied channels, readiness) catch them and raise
Unavailable with their own message. Every 503 carries `Retry-After:
RETRY_AFTER_SECONDS`. The handlers of HANDLERS are given the settings first,
bound by init_app.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .access import Refused
from .config import Config
from .store import KeyReused, NotReplicated, PartiallyStored, PartitionsMismatch
from .validation import InvalidRequest

log = logging.getLogger("herald.publisher")


class Unavailable(Exception):
    """503 `redis_unavailable`: Redis cannot be read right now; the message says what for."""


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer: `{"error": code, "message": message}`."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _retry_after(config: Config) -> dict[str, str]:
    """The header every 503 carries: when to try again."""
    return {"Retry-After": str(config.retry_after_seconds)}


def invalid_request(config: Config, exc: InvalidRequest) -> Response:
    return error(exc.status, exc.code, exc.message)


def refused(config: Config, exc: Refused) -> Response:
    return error(exc.status, exc.code, exc.message, exc.headers)


def unavailable(config: Config, exc: Unavailable) -> Response:
    return error(503, "redis_unavailable", str(exc), _retry_after(config))


def key_reused(config: Config, exc: KeyReused) -> Response:
    return error(422, "idempotency_key_reused", "this Idempotency-Key was used with a different request")


def not_replicated(config: Config, exc: NotReplicated) -> Response:
    """503: stored on the primary, not confirmed by enough replicas (PUBLISH_WAIT_REPLICAS).

    The answer carries the ids: the events are in Redis and subscribers may
    have them, but a failover now could lose them.
    """
    log.error("publish not replicated in time: %s", exc)
    response = jsonify(
        error="not_replicated",
        message=f"the events were stored on the primary but only {exc.acked} of {exc.wanted} "
        "replicas confirmed them in time; retry with the same Idempotency-Key to confirm "
        "them without storing them twice",
        events=[{"channel": e.channel, "id": e.id} for e in exc.published.events],
    )
    response.status_code = 503
    response.headers.update(_retry_after(config))
    return response


def partially_stored(config: Config, exc: PartiallyStored) -> Response:
    """503: a batch over several partitions, some of them stored, then Redis failed.

    `events` names, per event of the request in order, its id if it was stored,
    else null. After a timeout (the failing partition's outcome is unknown) the
    answer is `redis_timeout`, and null means "maybe".
    """
    log.error("publish partially stored: %s", exc)
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
    response.headers.update(_retry_after(config))
    return response


def redis_full(config: Config, exc: redis.exceptions.OutOfMemoryError) -> Response:
    """503: Redis refused the write for memory (its `maxmemory`); nothing was stored."""
    log.error("publish refused, Redis is full: %s", exc)
    return error(
        503,
        "redis_full",
        "Redis is out of memory (maxmemory reached): nothing of this request was stored; "
        "retry later (history expires, or the operator raises REDIS_MAXMEMORY)",
        _retry_after(config),
    )


def misconfigured(config: Config, exc: PartitionsMismatch) -> Response:
    log.error("publish refused, misconfigured: %s", exc)
    return error(503, "misconfigured", str(exc), _retry_after(config))


def redis_timeout(config: Config, exc: redis.TimeoutError) -> Response:
    # The script may have run after all (a frozen Redis resumes it later).
    log.error("publish timed out, outcome unknown: %s", exc)
    return error(
        503,
        "redis_timeout",
        "Redis did not answer in time: the events may have been stored; "
        "retry with the same Idempotency-Key to publish them exactly once",
        _retry_after(config),
    )


def redis_unavailable(config: Config, exc: redis.RedisError) -> Response:
    log.error("publish failed, Redis unavailable: %s", exc)
    if isinstance(exc, redis.exceptions.MovedError) and config.redis_mode != "cluster":
        log.error("Redis answered MOVED: REDIS_URL is a cluster node; set REDIS_MODE=cluster")
    return error(
        503, "redis_unavailable", "events cannot be stored right now; retry later", _retry_after(config)
    )


def http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    # Keep the exception's own headers (Allow on a 405, for instance).
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return error(exc.code or 500, code, exc.description or code, headers)


def unexpected(exc: Exception) -> Response:
    log.exception("unexpected error")
    return error(500, "internal_error", "an unexpected error occurred")


# The answer to each exception a view may raise. Flask picks the handler of the
# nearest class in the exception's MRO: OutOfMemoryError and TimeoutError (both
# RedisErrors) get their own answers, any other RedisError the last one.
HANDLERS: dict[type[Exception], Callable[[Config, Any], Response]] = {
    InvalidRequest: invalid_request,
    Refused: refused,
    Unavailable: unavailable,
    KeyReused: key_reused,
    NotReplicated: not_replicated,
    PartiallyStored: partially_stored,
    redis.exceptions.OutOfMemoryError: redis_full,
    PartitionsMismatch: misconfigured,
    redis.TimeoutError: redis_timeout,
    redis.RedisError: redis_unavailable,
}
# What a view refuses on purpose (as opposed to a bug, answered 500).
EXPECTED = tuple(HANDLERS)


def init_app(app: Flask, config: Config) -> None:
    """Answer every error as JSON: the exceptions above, HTTP errors (404, 405...), and bugs."""
    for exception, handler in HANDLERS.items():
        app.register_error_handler(exception, functools.partial(handler, config))
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
