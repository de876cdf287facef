"""Logs as JSON lines, each with the request id nginx generates (X-Request-ID)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from flask import Flask, Response, has_request_context, request
from gunicorn.glogging import Logger
from pythonjsonlogger.json import JsonFormatter

# Where a request's id is kept: in its WSGI environ, which lives exactly as long.
REQUEST_ID_KEY = "herald.request_id"


class GunicornLogger(Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger, minus the per-request work of an access log that is off.

    With a logging config gunicorn builds every access line (formatting dates,
    copying headers) and only then lets the logger drop it.
    """

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


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


def log_config(level: str, access_log: bool = False) -> dict[str, Any]:
    """A logging.config dict: JSON lines on stderr for gunicorn's and our loggers.

    gunicorn's access logger writes a line per request whenever a logging config
    is given; it stays quiet unless `access_log` (nginx logs every request anyway).
    """
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "json",
        "filters": ["request_id"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
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
