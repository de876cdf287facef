"""Private channels: channels under a prefix need a signed subscribe token.

The token is a JWT signed with HS256 and SUBSCRIBE_SECRET (at least 32 bytes,
config.py refuses a shorter one). Its claims, checked strictly:

- `exp` is required and must be a number (a JSON number, not a string, not a
  boolean); it ends the stream when it passes. `nbf` and `iat`, when present,
  must be numbers too.
- `aud` must name SUBSCRIBE_AUDIENCE when that is set, and `iss` must be
  SUBSCRIBE_ISSUER when that is set; a token that carries an `aud` while no
  audience is configured is refused (PyJWT's rule).
- `channels` lists the channels it may read. An entry ending in `*` covers
  every channel starting with what comes before the `*` (`private-team-*`);
  any other entry names one channel exactly (`?`, `[` and a `*` anywhere else
  are plain characters, and no channel name contains them).

EventSource cannot send headers, so the token may also come as a cookie or the
`token` query parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

TIME_CLAIMS = ("exp", "nbf", "iat")


class AccessDenied(Exception):
    """A stream request refused for its channels: HTTP status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Grant:
    """What a request may read; `expires` is a Unix time, or None."""

    expires: float | None = None


def find_token(
    authorization: str | None, cookies: Mapping[str, str], args: Mapping[str, str], cookie: str
) -> str | None:
    """The token from `Authorization: Bearer`, else the cookie, else `?token=`."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return cookies.get(cookie) or args.get("token") or None


def is_number(value: Any) -> bool:
    """A JSON number: int or float, finite, and not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def covers(entry: str, channel: str) -> bool:
    """Whether one entry of the `channels` claim covers `channel`: a trailing `*`
    is a prefix match, anything else an exact match."""
    if entry.endswith("*"):
        return channel.startswith(entry[:-1])
    return channel == entry


def authorize(
    channels: Sequence[str],
    token: str | None,
    *,
    prefix: str,
    secret: str,
    audience: str = "",
    issuer: str = "",
) -> Grant:
    """Check that `token` covers every private channel in `channels`."""
    private = [c for c in channels if prefix and c.startswith(prefix)]
    if not private:
        return Grant()
    if not secret:
        raise AccessDenied(403, "private_channels_disabled", "private channels need SUBSCRIBE_SECRET")
    if token is None:
        raise AccessDenied(401, "token_required", f"channels starting with {prefix!r} need a subscribe token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            audience=audience or None,
            issuer=issuer or None,
            options={"require": ["exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AccessDenied(401, "token_expired", "the subscribe token has expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AccessDenied(
            401, "invalid_token", f"the subscribe token lacks the `{exc.claim}` claim"
        ) from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
        raise AccessDenied(
            401, "invalid_token", "the subscribe token is for another audience or issuer"
        ) from None
    except jwt.InvalidTokenError:
        raise AccessDenied(401, "invalid_token", "the subscribe token is not valid") from None
    # PyJWT accepts a string `exp` ("9999999999") and never checks it again.
    for name in TIME_CLAIMS:
        if name in claims and not is_number(claims[name]):
            raise AccessDenied(401, "invalid_token", f"the token's `{name}` claim must be a number")
    entries = claims.get("channels")
    if not isinstance(entries, list) or not all(isinstance(p, str) for p in entries):
        raise AccessDenied(401, "invalid_token", "the token's `channels` claim must be a list of strings")
    for channel in private:
        if not any(covers(entry, channel) for entry in entries):
            raise AccessDenied(403, "forbidden_channel", f"the token does not cover channel {channel!r}")
    return Grant(float(claims["exp"]))
