"""Who may call the publisher: no cross-site browser requests, and without a
PUBLISH_TOKEN only requests to a loopback host (docs/api.md, "Who may publish").

Cross-site: a browser sends any page's form POST (no preflight) and says where
it came from in `Origin` and `Sec-Fetch-Site`. A request from another origin
than the publisher's own (scheme from X-Forwarded-Proto, host from Host, as
nginx passes them), or that the browser calls `cross-site` or `same-site`, is
refused unless its Origin is in CORS_ALLOWED_ORIGINS, token or not. `Origin:
null` (sandboxed frames, files, some redirects) is never the publisher's own.
A browser's `Sec-Fetch-Site: same-origin` is trusted as it is (a page cannot
forge it), so the demo page works behind a proxy that rewrites the scheme.
Clients that send neither header (curl, servers, the Python client) are not
browsers and pass.

Loopback: with PUBLISH_TOKEN empty and PUBLISH_OPEN not true, the Host must be
a loopback name or address (localhost, 127.0.0.0/8, [::1], any port). A page
that rebinds its own DNS name to 127.0.0.1 reaches the publisher under that
name: this stops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import is_loopback

DEFAULT_PORTS = {"http": "80", "https": "443"}


def split_host(host: str) -> tuple[str, str | None]:
    """`name[:port]` or `[v6][:port]` -> (lowercased name, port or None)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        name, rest = host[: end + 1], host[end + 1 :]
        return name, rest[1:] if rest.startswith(":") and rest[1:] else None
    name, colon, port = host.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit():
        return host, None
    return name, port


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) is the request's own origin.

    nginx passes `Host: $host`, which has no port: then any port of the same
    scheme and name counts (Sec-Fetch-Site still tells other ports apart, as
    `same-site`).
    """
    own_scheme = scheme.split(",", 1)[0].strip().lower()
    o_scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or o_scheme != own_scheme or not rest or "/" in rest:
        return False
    o_name, o_port = split_host(rest)
    name, port = split_host(host)
    if o_name != name:
        return False
    if port is None:
        return True
    default = DEFAULT_PORTS.get(own_scheme)
    return (o_port or default) == (port or default)


class Guard:
    """The two rules, applied to a WSGI environ; `refusal` names the one broken."""

    def __init__(self, origins: tuple[str, ...], loopback_only: bool) -> None:
        self._wildcard = "*" in origins
        self._exact = frozenset(o for o in origins if o != "*")
        self.loopback_only = loopback_only

    def allowed_origin(self, origin: str | None) -> bool:
        """An Origin listed in CORS_ALLOWED_ORIGINS (any, with `*`)."""
        return origin is not None and (self._wildcard or origin in self._exact)

    def cross_site(self, environ: Mapping[str, Any]) -> bool:
        """True for a browser request from another site or origin that is not allowed."""
        origin = environ.get("HTTP_ORIGIN")
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if origin is None and site is None:
            return False  # not a browser (or one that says nothing: a top-level GET)
        if self.allowed_origin(origin):
            return False
        if site is not None:
            site = site.strip().lower()
            if site == "same-origin":
                return False
            if site in ("cross-site", "same-site"):
                return True
        if origin is None:
            return False  # Sec-Fetch-Site `none` (typed in the address bar) and no Origin
        scheme = environ.get("HTTP_X_FORWARDED_PROTO") or environ.get("wsgi.url_scheme", "http")
        return not same_origin(origin, scheme, environ.get("HTTP_HOST", ""))

    def remote_host(self, environ: Mapping[str, Any]) -> bool:
        """True when only loopback hosts may publish and this request's Host is none."""
        if not self.loopback_only:
            return False
        name, _ = split_host(environ.get("HTTP_HOST", ""))
        return not is_loopback(name)
