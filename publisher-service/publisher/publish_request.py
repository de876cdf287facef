"""What a `POST /publish` asks for: its events, read from the body by its
content type within the size limits (validation.py checks them), and its
Idempotency-Key. Anything wrong raises InvalidRequest (errors.py answers it)."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qs

from flask import request

from .config import Config
from .store import Idempotency
from .validation import Event, InvalidRequest, event_from_form, events_from_json, parse_json

JSON_TYPES = frozenset({"application/json"})
FORM_TYPE = "application/x-www-form-urlencoded"
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


def parse_events(config: Config) -> tuple[list[Event], bool, bytes]:
    """Read the request body into validated events according to its content type.

    Returns the events, whether the request was a batch, and the body.
    """
    environ = request.environ  # read once: each `request.` is a context lookup
    # The usual header needs no parsing; anything else (parameters, case) does.
    mimetype = environ.get("CONTENT_TYPE")
    if mimetype not in JSON_TYPES:
        mimetype = request.mimetype
    length = request.content_length
    if length is not None and length > config.max_body_bytes:
        raise _too_large(config)
    if "wsgi.input_terminated" in environ:
        # What get_data reads from a server that ends the input itself (gunicorn)
        # when MAX_CONTENT_LENGTH is None (create_app), without werkzeug's stream
        # lookups, which cost more than the read.
        body = environ["wsgi.input"].read()
    else:
        body = request.get_data(cache=False)
    if len(body) > config.max_body_bytes:
        raise _too_large(config)
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


def _too_large(config: Config) -> InvalidRequest:
    return InvalidRequest(
        413, "body_too_large", f"the body is over the limit of {config.max_body_bytes} bytes"
    )


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
