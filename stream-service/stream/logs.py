# Twins: publisher-service/publisher/logs.py and stream-service/stream/logs.py
# are identical, byte for byte: change both together (tests/unit/test_conventions.py checks it).
"""Logs as JSON lines, each with the request id nginx generates (X-Request-ID),
and never a subscribe token."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, has_request_context, request
from gunicorn.glogging import Logger
from pythonjsonlogger.json import JsonFormatter

# Where a request's id is kept: in its WSGI environ, which lives exactly as long.
REQUEST_ID_KEY = "herald.request_id"

# A query parameter the stream service reads as `token` (subscribe tokens travel
# as ?token=, EventSource cannot send headers), however its name is spelt:
# Werkzeug decodes percent-encoded letters (%74oken), so they match too, and so
# does any case (more than needed). Its value runs to the next `&` or space.
TOKEN_PARAMETER = re.compile(r"((?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=)[^&\s]*", re.IGNORECASE)
# Formats the traceback of a record before it is redacted.
_TRACEBACKS = logging.Formatter()


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger, minus the per-request work of an access log that is off.

    With a logging config gunicorn builds every access line (formatting dates,
    copying headers) and only then lets the logger drop it.
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


def redact(text: str) -> str:
    """`text` with the value of every token parameter replaced by [redacted]."""
    return TOKEN_PARAMETER.sub(r"\1[redacted]", text)


def request_id() -> str:
    """The current request's id: nginx's X-Request-ID, else a new one (made once)."""
    environ = request.environ
    rid: str | None = environ.get(REQUEST_ID_KEY)
    if rid is None:
        rid = environ[REQUEST_ID_KEY] = environ.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
    return rid


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to every record (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id() if has_request_context() else None
        return True


class RedactFilter(logging.Filter):
    """Takes token values out of every record: its message (gunicorn logs the
    request line of a request it refuses, or the URI of one that failed) and
    its traceback. Runs before the JSON formatter, on the text as logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def log_config(level: str, access_log: bool = False) -> dict[str, Any]:
    """A logging.config dict: JSON lines on stderr for gunicorn's and our loggers.

    gunicorn's access logger writes a line per request whenever a logging config
    is given; it stays quiet unless `access_log` (nginx logs every request anyway).
    Every line goes through RedactFilter: no subscribe token reaches a log.
    """
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["request_id", "redact"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}, "redact": {"()": RedactFilter}},
        "formatters": {
            "json": {
                "()": JsonFormatter,
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            }
        },
        "handlers": {"json": handler},
        "root": {"level": level.upper(), "handlers": ["json"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["json"], "propagate": False},
            "gunicorn.access": {
                "level": "INFO" if access_log else "WARNING",
                "handlers": ["json"],
                "propagate": False,
            },
        },
    }


def init_app(app: Flask) -> None:
    """Give every request an id: nginx's X-Request-ID, else a new one; echo it back.

    The id is looked up when first needed (a log line, the answer's header)
    rather than in a before_request hook.
    """

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = request_id()
        return response
