"""Receiving Herald's lifecycle webhooks: `verify_webhook` checks the Standard Webhooks
signature over the raw body and returns the parsed event (or batch)."""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from standardwebhooks import Webhook

_SECRET_PREFIX = "whsec_"
# Integer Unix seconds, ASCII digits only (not '²', which str.isdigit() accepts), no sign,
# no fraction, no leading zero: the value is signed as sent, and `sign` writes it canonically.
# Twelve digits reach past the year 9999; int() of a long string is slow.
_TIMESTAMP_RE = re.compile(r"0|[1-9][0-9]{0,11}")
_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class WebhookVerificationError(ValueError):
    """The request is not a genuine, fresh Herald webhook: answer it with a 4xx and drop it."""


def _keys(secret: str | Sequence[str]) -> list[bytes]:
    """The HMAC keys of one secret or several (during a rotation): `whsec_<base64>`."""
    if isinstance(secret, (bytes, bytearray)):
        raise TypeError("the webhook secret must be a str ('whsec_...'), not bytes")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("no webhook secret given")
    keys = []
    for i, one in enumerate(secrets):
        if not isinstance(one, str):
            raise TypeError(f"webhook secret #{i} is {type(one).__name__}, expected str ('whsec_...')")
        encoded = one.removeprefix(_SECRET_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            # Never the secret itself in the message.
            raise ValueError(f"webhook secret #{i} is not 'whsec_' followed by base64") from None
        if not key:
            raise ValueError(f"webhook secret #{i} is empty")
        keys.append(key)
    return keys


def _header_values(headers: Mapping[str, str]) -> dict[str, str]:
    """The three webhook headers, by lower-case name, from any mapping (a dict, werkzeug's or
    httpx's headers): one value each; an id or timestamp sent twice must not differ."""
    found: dict[str, list[str]] = {name: [] for name in _HEADERS}
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() in found and isinstance(value, str):
            found[name.lower()].append(value.strip(" \t"))
    values = {}
    for name, seen in found.items():
        present = [v for v in seen if v]
        if not present:
            raise WebhookVerificationError(f"missing {name} header")
        if name == "webhook-signature":
            values[name] = " ".join(present)
        elif len(set(present)) > 1:
            raise WebhookVerificationError(f"{name} header sent more than once, with different values")
        else:
            values[name] = present[0]
    return values


def verify_webhook(
    body: bytes | bytearray,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a Herald webhook's signature over the raw body; return the parsed event (or batch).

    `body` is the request body exactly as received (bytes: Flask's `request.get_data()`,
    Django's `request.body`, Starlette's `await request.body()`); `headers` any mapping of the
    request's headers, names compared case-insensitively. `secret` is the endpoint's secret
    (`whsec_...`), or several during a rotation: a signature by any one of them is enough.

    Raises WebhookVerificationError (a ValueError) when a header is missing or malformed, the
    timestamp is further than `tolerance_seconds` from `now` (default: the clock), no signature
    matches, or the signed body is not a JSON object. A bad `secret` or `tolerance_seconds`
    raises ValueError/TypeError, and a `str` body TypeError: those are the caller's mistakes.
    """
    if isinstance(body, str):
        raise TypeError(
            "verify_webhook needs the raw request body as bytes, exactly as received (e.g. Flask's "
            "request.get_data()), not str: decoding and re-encoding can change the signed bytes"
        )
    if not isinstance(body, (bytes, bytearray)):
        raise TypeError(f"verify_webhook needs the raw request body as bytes, not {type(body).__name__}")
    if not (math.isfinite(tolerance_seconds) and tolerance_seconds >= 0):
        raise ValueError("tolerance_seconds must be a finite number >= 0")
    if now is not None and not math.isfinite(now):
        raise ValueError("now must be a finite number of Unix seconds")
    keys = _keys(secret)
    values = _header_values(headers)
    msg_id = values["webhook-id"]
    if not msg_id.isascii() or not msg_id.isprintable():
        raise WebhookVerificationError("webhook-id header is not printable ASCII")

    stamp = values["webhook-timestamp"]
    if not _TIMESTAMP_RE.fullmatch(stamp):
        raise WebhookVerificationError("webhook-timestamp header is not an integer number of Unix seconds")
    timestamp = int(stamp)
    clock = time.time() if now is None else now
    if timestamp < clock - tolerance_seconds:
        raise WebhookVerificationError(
            f"webhook-timestamp is {clock - timestamp:.0f} s old, "
            f"beyond the {tolerance_seconds:g} s tolerance"
        )
    if timestamp > clock + tolerance_seconds:
        raise WebhookVerificationError(
            f"webhook-timestamp is {timestamp - clock:.0f} s in the future, "
            f"beyond the {tolerance_seconds:g} s tolerance"
        )
    try:
        when = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)  # noqa: UP017 (3.10)
    except (OverflowError, ValueError, OSError):
        raise WebhookVerificationError("webhook-timestamp header is out of range") from None

    payload = bytes(body)
    # Only well-formed ASCII entries can be compared (compare_digest refuses other str).
    offered = [entry.encode() for entry in values["webhook-signature"].split() if entry.isascii()]
    matched = False
    for key in keys:
        expected = Webhook(key).sign(msg_id=msg_id, timestamp=when, data=payload).encode()
        # Every entry against every key: no early exit on which one matched.
        for entry in offered:
            matched |= hmac.compare_digest(expected, entry)
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches the body with the given secret(s)")

    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise WebhookVerificationError("the signed body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookVerificationError("the signed body is JSON but not an object (event or batch)")
    return event
