# Twins: http_error() and unexpected() here and in publisher-service/publisher/errors.py are
# identical, so both services answer HTTP errors and crashes alike: change both
# together (tests/unit/test_conventions.py checks it).
"""The service's JSON errors, `{"error": code, "message": message}`: views raise,
the handlers here answer.

| exception | answer |
|---|---|
| `params.BadRequest` | 400 with its code |
| `auth.AccessDenied` | its status (401 with a `WWW-Authenticate` challenge, or 403) |
| `core.Full` | 503 `too_many_connections`, with `Retry-After` |
| `core.Unavailable` | 503 `unavailable`, with `Retry-After` |
| werkzeug's `HTTPException` | its status, its name as the code (404, 405 with `Allow`...) |
| anything else | 500 `internal_error`, logged |
"""

from __future__ import annotations

import logging

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from .auth import AccessDenied
from .core import Full, Unavailable
from .params import BadRequest

log = logging.getLogger("herald.stream")

RETRY_AFTER = "HERALD_RETRY_AFTER"  # app.config key: the seconds a 503 asks clients to wait


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON error answer: `{"error": code, "message": message}`."""
    response = jsonify(error=code, message=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def unavailable(code: str, message: str) -> Response:
    """A 503 that says when to try again (RETRY_AFTER_SECONDS)."""
    return error(503, code, message, {"Retry-After": current_app.config[RETRY_AFTER]})


def too_many_connections(exc: Full) -> Response:
    return unavailable("too_many_connections", str(exc))


def not_now(exc: Unavailable) -> Response:
    return unavailable("unavailable", str(exc))


def bad_request(exc: BadRequest) -> Response:
    return error(400, exc.code, exc.message)


def access_denied(exc: AccessDenied) -> Response:
    challenge = {"WWW-Authenticate": 'Bearer realm="herald"'} if exc.status == 401 else {}
    return error(exc.status, exc.code, exc.message, challenge)


def http_error(exc: HTTPException) -> Response:
    code = (exc.name or "error").lower().replace(" ", "_")
    # Keep the exception's own headers (Allow on a 405, for instance).
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return error(exc.code or 500, code, exc.description or code, headers)


def unexpected(exc: Exception) -> Response:
    log.exception("unexpected error")
    return error(500, "internal_error", "an unexpected error occurred")


def init_app(app: Flask, retry_after_seconds: int) -> None:
    """Answer every exception of `app`'s requests as a JSON error (table above)."""
    app.config[RETRY_AFTER] = str(retry_after_seconds)
    app.register_error_handler(BadRequest, bad_request)
    app.register_error_handler(AccessDenied, access_denied)
    app.register_error_handler(Full, too_many_connections)
    app.register_error_handler(Unavailable, not_now)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
