"""The publisher's routes: `POST /publish`, `GET /channels/<channel>`,
`GET /channels?occupied=true`, `/healthz`, `/readyz`.

A view reads the request, calls the store and answers; whatever it refuses it
raises, and errors.py answers it. The parts a view uses (the settings, the
access rules, the store) are its first argument, bound by init_app.

Two choices here are for CPU, measured per publish: the views are routed on
the app itself, not through a blueprint (Flask looks up a blueprint's hooks by
its name in every request), and their parts are bound once, not looked up
through `current_app` in every request. Each would cost a publish ~1.3% more
instructions in the app.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from flask import Flask, Response, current_app, jsonify, request

from . import metrics
from .access import Access
from .config import Config
from .errors import EXPECTED, Unavailable
from .metrics import EVENTS_PUBLISHED
from .occupied_request import encode_cursor, parse_occupied_query
from .publish_request import idempotency, parse_events
from .store import EventStore, Stored
from .validation import CHANNEL_RE, InvalidRequest

log = logging.getLogger("herald.publisher")


@dataclass(frozen=True)
class Parts:
    """What the views use, made once by create_app."""

    config: Config
    access: Access
    store: EventStore


def init_app(app: Flask, parts: Parts) -> None:
    """Route the publisher's URLs to the views below, each given `parts`."""
    app.add_url_rule("/publish", "publish", functools.partial(publish, parts), methods=["POST"])
    app.add_url_rule("/channels/<channel>", "presence", functools.partial(presence, parts))
    app.add_url_rule("/channels", "occupied", functools.partial(occupied, parts))
    app.add_url_rule("/healthz", "healthz", healthz)
    app.add_url_rule("/readyz", "readyz", functools.partial(readyz, parts))


def counted(view: Callable[[Parts], Response]) -> Callable[[Parts], Response]:
    """Count a publish request by status, and its duration (metrics), refusals included."""

    @functools.wraps(view)
    def timed(parts: Parts) -> Response:
        started = time.perf_counter()
        try:
            response = view(parts)
        except EXPECTED as exc:
            # Answered here, as Flask would answer it (errors.py), to count its status.
            response = current_app.make_response(current_app.handle_user_exception(exc))
        metrics.publish_done(response.status_code, time.perf_counter() - started)
        return response

    return timed


def accepted_json(events: list[Stored], batch: bool) -> bytes:
    """The 202 body, byte for byte what `jsonify` makes of the same answer.

    Channels (`[A-Za-z0-9_.:-]`) and ids (hex digits, `-`, digits) need no JSON
    escaping, so the text is put together directly: compact, keys sorted, a
    final newline.
    """
    items = ",".join([f'{{"channel":"{e.channel}","id":"{e.id}"}}' for e in events])
    return (f'{{"events":[{items}]}}\n' if batch else f"{items}\n").encode()


@counted
def publish(parts: Parts) -> Response:
    """Store the request's events; 202 with their ids."""
    parts.access.authorize("publish")
    events, batch, body = parse_events(parts.config)
    published = parts.store.publish(events, idempotency(parts.config, body))
    if published.new:
        EVENTS_PUBLISHED.inc(published.new)
    response = Response(accepted_json(published.events, batch), 202, mimetype="application/json")
    if published.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def presence(parts: Parts, channel: str) -> Response:
    """Streams subscribed to `channel` now, over every stream replica."""
    parts.access.authorize("read presence")
    if not CHANNEL_RE.fullmatch(channel):
        raise InvalidRequest(400, "invalid_channel", "a channel is 1-128 characters of A-Z a-z 0-9 _ . : -")
    try:
        count = parts.store.subscribers(channel)
    except redis.RedisError as exc:
        log.error("presence read failed: %s", exc)
        raise Unavailable("presence cannot be read right now") from exc
    return jsonify(channel=channel, subscribers=count)


def occupied(parts: Parts) -> Response:
    """The channels with streams now (or vacating), with their subscribers, a page
    at a time; kept only while webhooks are on (docs/api.md)."""
    parts.access.authorize("list the occupied channels")
    if not parts.config.webhooks:
        raise InvalidRequest(
            404,
            "occupancy_off",
            "the occupied channels are kept only while webhooks are on: set WEBHOOK_URL "
            "(compose then sets WEBHOOKS=true on the stream service and the publisher)",
        )
    query = parse_occupied_query(request.args, parts.config.partitions)
    try:
        page = parts.store.occupied(query.start, query.limit)
    except redis.RedisError as exc:
        log.error("occupancy read failed: %s", exc)
        raise Unavailable("the occupied channels cannot be read right now") from exc
    return jsonify(
        channels=[{"channel": c, "subscribers": n} for c, n in page.channels],
        next_cursor=None if page.next is None else encode_cursor(*page.next),
    )


def healthz() -> Response:
    return jsonify(status="ok")


def readyz(parts: Parts) -> Response:
    """Ready when every Redis server holding a partition answers."""
    try:
        parts.store.ping()
    except redis.RedisError as exc:
        raise Unavailable(f"Redis is not reachable: {exc}") from exc
    return jsonify(status="ready")
