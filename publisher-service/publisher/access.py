"""Who may call the publisher: the guard's two rules (guard.py) and the publish
tokens, checked per request; a request refused raises Refused (errors.py answers it)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from typing import Any

from flask import request

from .config import Config
from .guard import Guard

log = logging.getLogger("herald.publisher")


class Refused(Exception):
    """A request refused for who sent it or from where: 401 or 403."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


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


class Access:
    """The publisher's access rules, checked on the current request.

    Made once per app, it logs at start whether publishing needs no token.
    """

    def __init__(self, config: Config) -> None:
        self._guard = Guard(config.cors_origins, config.loopback_only)
        self._auth = Authenticator(config.publish_tokens)
        if self._auth.open and config.publish_open:
            log.warning(
                "PUBLISH_TOKEN is empty and PUBLISH_OPEN=true: anyone who reaches /publish can publish"
            )
        elif self._auth.open:
            log.warning(
                "PUBLISH_TOKEN is empty: publishing is allowed to requests for a loopback host only "
                "(localhost, 127.0.0.1, [::1])"
            )

    def check_origin(self) -> None:
        """403 for a cross-site browser request, or (no token) a Host that is not loopback."""
        self._check_origin(request.environ)

    def authorize(self, action: str) -> None:
        """The origin checks, then 401 unless the request carries a publish token
        (or publishing is open); `action` names what the token is for."""
        environ = request.environ  # read once: each `request.` is a context lookup
        self._check_origin(environ)
        auth = self._auth
        if auth.open or auth.allows(environ.get("HTTP_AUTHORIZATION")):
            return
        message = f"a valid bearer token is required to {action}"
        raise Refused(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="herald"'})

    def _check_origin(self, environ: Mapping[str, Any]) -> None:
        if self._guard.cross_site(environ):
            raise Refused(
                403,
                "cross_site",
                "this request comes from a page of another site or origin, which is not in "
                "CORS_ALLOWED_ORIGINS: refused, with a token or without",
            )
        if self._guard.remote_host(environ):
            raise Refused(
                403,
                "host_not_allowed",
                "PUBLISH_TOKEN is empty, so only requests to a loopback host (localhost, "
                "127.0.0.1, [::1]) are served; set PUBLISH_TOKEN, or PUBLISH_OPEN=true to "
                "publish without a token from any host",
            )
