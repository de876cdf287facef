"""Turn a publish request body into validated events, or a clear error.

Nothing that could break an SSE frame gets through: names are restricted to
`[A-Za-z0-9_.:-]`, and data is re-encoded as compact JSON, which escapes every
control character (CR, LF and NUL included), and U+2028, U+2029 and U+0085,
which JSON leaves raw and some SSE parsers take for line ends.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
EVENT_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Event names the stream service sends itself: clients treat them as Herald's.
RESERVED_EVENTS = frozenset({"reset", "token_expired"})
DEFAULT_EVENT = "message"
EVENT_FIELDS = frozenset({"channel", "event", "data"})


class InvalidRequest(Exception):
    """A request the publisher refuses: carries the HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Event:
    """One validated event, its data already encoded as compact JSON text."""

    channel: str
    event: str
    data: str


def _bad(message: str, code: str = "invalid_event") -> InvalidRequest:
    return InvalidRequest(400, code, message)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _bad(f"duplicate key {dup!r} in JSON object", "invalid_json")
    return obj


def _no_constants(name: str) -> Any:
    raise _bad(f"{name} is not valid JSON", "invalid_json")


# Made once: json.loads and json.dumps with options build a new decoder or
# encoder on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# Characters JSON may leave raw (they only occur inside strings) that a line
# splitter other than the WHATWG one ends a line on: httpx-sse before 0.4.2,
# Python's str.splitlines. Escaped, the text keeps the same JSON value.
_LINE_BREAKS = (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\u0085"))


def parse_json(body: bytes) -> Any:
    """Parse a request body as strict JSON (UTF-8, no NaN, no duplicate keys)."""
    if not body.strip():
        raise _bad("the request body is empty", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("the request body is not valid UTF-8", "invalid_json") from None
    try:
        if text.startswith("\ufeff"):  # json.loads refuses it, with its own message
            return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
        return _DECODER.decode(text)
    except InvalidRequest:
        raise
    except RecursionError:
        raise _bad("the JSON document is nested too deeply", "invalid_json") from None
    except ValueError as exc:
        raise _bad(f"malformed JSON: {exc}", "invalid_json") from None


def encode_data(data: Any, max_bytes: int) -> str:
    """Encode event data as compact JSON text, refusing what is too large."""
    try:
        text = _ENCODER.encode(data)
        for raw, escaped in _LINE_BREAKS:
            if raw in text:
                text = text.replace(raw, escaped)
        size = len(text.encode("utf-8"))
    except RecursionError:
        raise _bad("data is nested too deeply") from None
    except (UnicodeEncodeError, ValueError):
        raise _bad("data contains a lone surrogate or a non-finite number") from None
    if size > max_bytes:
        raise InvalidRequest(
            413, "event_too_large", f"data is {size} bytes as JSON; the limit is {max_bytes}"
        )
    return text


def _name(value: Any, field: str, pattern: re.Pattern[str], limit: int) -> str:
    if not isinstance(value, str):
        raise _bad(f"{field} must be a string")
    if not pattern.fullmatch(value):
        raise _bad(f"{field} must be 1-{limit} characters of A-Z a-z 0-9 _ . : -")
    return value


def event_from_fields(fields: Mapping[str, Any], max_bytes: int, *, raw_data: bool) -> Event:
    """Validate one event given as a mapping (a JSON object or form fields).

    With `raw_data` the data field is a string to send as a JSON string (forms).
    """
    unknown = set(fields) - EVENT_FIELDS
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(sorted(unknown))}")
    if "channel" not in fields:
        raise _bad("channel is required")
    if "data" not in fields:
        raise _bad("data is required")
    channel = _name(fields["channel"], "channel", CHANNEL_RE, 128)
    event = _name(fields.get("event", DEFAULT_EVENT), "event", EVENT_RE, 64)
    if event in RESERVED_EVENTS:
        raise _bad(f"event {event!r} is reserved: Herald sends it itself (docs/api.md)")
    data = fields["data"]
    if raw_data and not isinstance(data, str):
        raise _bad("data must be a string")
    return Event(channel, event, encode_data(data, max_bytes))


def events_from_json(doc: Any, max_batch: int, max_bytes: int) -> tuple[list[Event], bool]:
    """Validate a JSON document: one event object or a batch (array) of them.

    Returns the events and whether the request was a batch.
    """
    if isinstance(doc, dict):
        return [event_from_fields(doc, max_bytes, raw_data=False)], False
    if not isinstance(doc, list):
        raise _bad("the body must be a JSON object or an array of objects")
    if not doc:
        raise _bad("the batch is empty", "empty_batch")
    if len(doc) > max_batch:
        raise InvalidRequest(
            413, "batch_too_large", f"the batch has {len(doc)} events; the limit is {max_batch}"
        )
    events = []
    for index, item in enumerate(doc):
        if not isinstance(item, dict):
            raise _bad(f"batch item {index} must be a JSON object")
        try:
            events.append(event_from_fields(item, max_bytes, raw_data=False))
        except InvalidRequest as exc:
            exc.message = f"batch item {index}: {exc.message}"
            raise
    return events, True


def event_from_form(form: Mapping[str, list[str]], max_bytes: int) -> Event:
    """Validate a form-encoded event (fields channel, event, data; data is text)."""
    fields: dict[str, str] = {}
    for key, values in form.items():
        if len(values) != 1:
            raise _bad(f"form field {key!r} must be given once")
        fields[key] = values[0]
    return event_from_fields(fields, max_bytes, raw_data=True)
