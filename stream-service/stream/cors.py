"""CORS for /stream and /history: pages on other origins may read them, and send
headers (a subscribe token in `Authorization`, `Last-Event-ID`) after a preflight.

`CORS_ALLOWED_ORIGINS` lists exact origins; an exact origin gets
`Access-Control-Allow-Credentials: true` (for `withCredentials` and cookies),
a `*` in the list allows any other origin, never with credentials.

- Every answer of these paths (errors included) carries the CORS headers for
  an allowed origin, and exposes `Retry-After`, so a page on another origin
  can read a refusal and honour its wait.
- `OPTIONS` with an `Origin` is a preflight: 204 with the methods, the
  headers and a max age for an allowed origin; a JSON 403
  `origin_not_allowed` for any other (the browser fails either way; the 403
  says why, to whoever reads the network panel or the logs).
  `OPTIONS` without an `Origin` is no preflight: 204 with `Allow`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flask import Flask, Response, request

from .errors import error

ALLOW_METHODS = "GET, HEAD"
ALLOW = "GET, HEAD, OPTIONS"
ALLOW_HEADERS = "Authorization, Last-Event-ID"
EXPOSE_HEADERS = "Retry-After"
MAX_AGE_SECONDS = 600  # how long a browser may reuse a preflight's answer


def allowed(origin: str | None, origins: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers for `origin`: credentials for an exact origin, `*` without."""
    if not origin:
        return {}
    if origin in origins:
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
    if "*" in origins:
        return {"Access-Control-Allow-Origin": "*"}
    return {}


def init_app(app: Flask, origins: tuple[str, ...], paths: Iterable[str]) -> None:
    """Answer preflights on `paths`, and add CORS headers to every answer there."""
    paths = tuple(paths)

    def preflight() -> Response:
        origin = request.headers.get("Origin")
        if origin is None:
            return Response(status=204, headers={"Allow": ALLOW})
        headers = allowed(origin, origins)
        if not headers:
            answer = error(
                403, "origin_not_allowed", f"the origin {origin!r} is not in CORS_ALLOWED_ORIGINS", {}
            )
            answer.vary.add("Origin")
            return answer
        answer = Response(
            status=204,
            headers={
                **headers,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
                "Allow": ALLOW,
            },
        )
        answer.vary.add("Origin")
        return answer

    for path in paths:
        app.add_url_rule(
            path,
            endpoint="preflight " + path,
            view_func=preflight,
            methods=["OPTIONS"],
            provide_automatic_options=False,
        )

    @app.after_request
    def cors_headers(response: Response) -> Response:
        if request.path not in paths or request.method == "OPTIONS":
            return response
        response.vary.add("Origin")
        headers = allowed(request.headers.get("Origin"), origins)
        if headers:
            for name, value in headers.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Access-Control-Expose-Headers", EXPOSE_HEADERS)
        return response
