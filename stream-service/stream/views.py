"""The stream service's routes: /stream, /history, and /healthz, /readyz, /stats.

Only GET opens a stream. Flask answers HEAD for every GET route by running the
view; HEAD gets the headers a GET would get and never attaches a subscriber.
OPTIONS on /stream and /history answers CORS preflights (stream/cors.py, so
not Flask's automatic OPTIONS): a page on another origin sends the token and
Last-Event-ID in headers. Every other method gets a JSON 405 with
`Allow: GET, HEAD, OPTIONS` (errors.py).

Views raise (BadRequest, AccessDenied, Full, Unavailable); errors.py answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from . import auth, handover, slots
from .auth import Grant, find_token
from .config import Config
from .core import Full, Unavailable
from .errors import unavailable
from .history import History
from .hub import Hub
from .pages import read_page
from .params import (
    MAX_HISTORY_LIMIT,
    parse_after,
    parse_channels,
    parse_last_event_id,
    parse_limit,
    refuse_repeats,
)
from .records import Replay, Stream
from .topology import Topology
from .writer import Limits

log = logging.getLogger("herald.stream")

bp = Blueprint("stream", __name__)

SERVICE = "herald.stream"  # app.extensions key: the Service the views serve from
# Neither a cache nor nginx's buffer may hold a stream's events back.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Service:
    """What the views serve from: one per worker, built by create_app."""

    config: Config
    hub: Hub
    history: History
    topology: Topology
    limits: Limits


def init_app(app: Flask, service: Service) -> None:
    """Serve the routes of this module from `service`."""
    app.extensions[SERVICE] = service
    app.register_blueprint(bp)


def service() -> Service:
    """The Service of the current app."""
    return current_app.extensions[SERVICE]  # type: ignore[no-any-return]


def requested_channels(*single: str) -> list[str]:
    """The request's channels, validated; first a 400 if `token` or one of the
    `single` parameters comes more than once."""
    refuse_repeats(request.args, (*single, "token"))
    return parse_channels(request.args.getlist("channel"), service().config.max_channels_per_stream)


def authorize(channels: list[str]) -> Grant:
    """What the request's subscribe token grants on `channels` (AccessDenied if not enough)."""
    config = service().config
    token = find_token(
        request.headers.get("Authorization"), request.cookies, request.args, config.token_cookie
    )
    return auth.authorize(
        channels,
        token,
        prefix=config.private_prefix,
        secret=config.subscribe_secret,
        audience=config.subscribe_audience,
        issuer=config.subscribe_issuer,
    )


@bp.route("/stream", methods=["GET"], provide_automatic_options=False)
def stream() -> Response:
    """Server-Sent Events of the requested channels, from the resume point if any."""
    channels = requested_channels("lastEventId")
    last = parse_last_event_id(request.headers.get("Last-Event-ID"), request.args.get("lastEventId"))
    grant = authorize(channels)
    served = service()
    if request.method == "HEAD":
        if served.hub.clients >= served.config.max_connections:
            raise Full()
        # An empty iterable, not b"": no Content-Length of 0 (a GET has none).
        return Response(iter(()), mimetype=handover.MIMETYPE, headers=STREAM_HEADERS)
    opened = Stream(channels, last, grant.expires)
    replay = open_stream(served.hub, opened)
    return handover.respond(handover.StreamBody(served.hub, opened, replay, served.limits), STREAM_HEADERS)


def open_stream(hub: Hub, stream: Stream) -> dict[int, Replay] | None:
    """Open `stream` in the hub and read the first page of its history."""
    try:
        hub.open(stream)
        return hub.read_history(stream)
    except Unavailable:
        raise  # Full or Unavailable: the hub has let it go already
    except BaseException:
        hub.leave(stream)
        raise


@bp.route("/history", methods=["GET"], provide_automatic_options=False)
def history_page() -> Response:
    """Recent or missed events as JSON, and the id to open /stream from afterwards."""
    channels = requested_channels("after", "limit")
    after = parse_after(request.args.get("after"))
    limit = parse_limit(request.args.get("limit"), MAX_HISTORY_LIMIT)
    authorize(channels)
    served = service()
    try:
        page = read_page(served.history, channels, served.config.partitions, after, limit)
    except redis.RedisError as exc:
        log.error("history read failed: %s", exc)
        raise Unavailable("history cannot be read right now") from exc
    response = jsonify(page.as_json())
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    try:
        service().topology.client().ping()
    except redis.RedisError as exc:
        return unavailable("redis_unavailable", f"Redis is not reachable: {exc}")
    return jsonify(status="ready")


@bp.get("/stats")
def stats() -> Response:
    # Which of nginx's sockets this replica serves (stream/slots.py), if any.
    return jsonify({**service().hub.snapshot(), "slot": slots.current()})
