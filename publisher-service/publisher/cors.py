"""CORS for POST /publish: exact allowed origins, preflight answered here.

Credentials (cookies, Authorization from a browser) are allowed only for an
exact origin; a configured `*` opens publishing to any origin without them.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, request

ALLOWED_HEADERS = "Content-Type, Authorization, Idempotency-Key"


def init_app(app: Flask, origins: tuple[str, ...], check_origin: Callable[[], None]) -> None:
    """Answer preflights for /publish and add CORS headers for allowed origins.

    `check_origin` refuses a preflight (raises) as it would the request
    (publisher/access.py).
    """
    wildcard = "*" in origins
    exact = frozenset(o for o in origins if o != "*")

    def allow(response: Response) -> Response:
        origin = request.environ.get("HTTP_ORIGIN")
        if not origin:
            return response
        if origin in exact:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.add("Vary", "Origin")
        elif wildcard:
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.route("/publish", methods=["OPTIONS"])
    def preflight() -> Response:
        check_origin()
        response = Response(status=204)
        if request.headers.get("Origin") in exact or wildcard:
            response.headers["Access-Control-Allow-Methods"] = "POST"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
        return allow(response)

    if origins:
        # With no origin allowed no answer gets CORS headers: no per-request hook.
        app.after_request(allow)
