"""Private channels: channels under a prefix need a signed subscribe token.

The token is a JWT signed with HS256 and SUBSCRIBE_SECRET whose `channels`
claim lists the channels, or shell-style patterns (`private-team-*`), it may
read; its `exp` ends the stream when it passes. EventSource cannot send
headers, so the token may also come as a cookie or the `token` query parameter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jwt


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


def authorize(channels: Sequence[str], token: str | None, *, prefix: str, secret: str) -> Grant:
    """Check that `token` covers every private channel in `channels`."""
    private = [c for c in channels if prefix and c.startswith(prefix)]
    if not private:
        return Grant()
    if not secret:
        raise AccessDenied(403, "private_channels_disabled", "private channels need SUBSCRIBE_SECRET")
    if token is None:
        raise AccessDenied(401, "token_required", f"channels starting with {prefix!r} need a subscribe token")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": []})
    except jwt.ExpiredSignatureError:
        raise AccessDenied(401, "token_expired", "the subscribe token has expired") from None
    except jwt.InvalidTokenError:
        raise AccessDenied(401, "invalid_token", "the subscribe token is not valid") from None
    patterns = claims.get("channels")
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AccessDenied(401, "invalid_token", "the token's `channels` claim must be a list of strings")
    for channel in private:
        if not any(fnmatch.fnmatchcase(channel, p) for p in patterns):
            raise AccessDenied(403, "forbidden_channel", f"the token does not cover channel {channel!r}")
    exp = claims.get("exp")
    return Grant(float(exp) if isinstance(exp, int | float) else None)
