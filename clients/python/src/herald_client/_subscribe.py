"""Subscribing: `subscribe` yields every event once, reconnecting with resume."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource, ServerSentEvent

from ._publish import HeraldError, _error, retry_after

CONTROL_EVENTS = ("reset", "token_expired")  # Herald's own: never wrapped in a channel


@dataclass(frozen=True)
class Event:
    """One event: its id (the position to resume from), channel, name and data (parsed JSON).

    A `reset` (history could not cover a gap) arrives as an event named "reset"
    whose data is `{"reason": ...}` and whose channel is None.
    """

    id: str
    channel: str | None
    event: str
    data: Any


def _to_event(sse: ServerSentEvent, channels: Sequence[str]) -> Event:
    data = json.loads(sse.data)
    if sse.event in CONTROL_EVENTS:
        return Event(sse.id, None, sse.event, data)
    if len(channels) > 1:
        # On a stream of several channels each event names its channel (docs/api.md).
        return Event(sse.id, data["channel"], sse.event, data["data"])
    return Event(sse.id, channels[0], sse.event, data)


def subscribe(
    base_url: str,
    channels: Sequence[str],
    last_event_id: str | None = None,
    *,
    token: str | None = None,
    read_timeout: float = 60.0,
    max_delay: float = 30.0,
    client: httpx.Client | None = None,
) -> Iterator[Event]:
    """Events of `channels`, from after `last_event_id` (None: from now), for ever.

    After a network error, an end of stream or a 5xx/429 answer it reconnects
    (backing off with jitter, honouring `Retry-After`) and resumes from the last
    id it saw, so nothing is lost or repeated. Frames without data (Herald's
    position frames) move the resume point but are not handed out. A refusal
    (4xx: bad channel, missing token) raises `HeraldError`. Stop by breaking
    out of the loop.
    """
    wanted = list(dict.fromkeys(channels))
    if not wanted:
        raise ValueError("subscribe to at least one channel")
    url = base_url.rstrip("/") + "/stream"
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(10.0, read=read_timeout))
    last = last_event_id
    failures = 0
    try:
        while True:
            headers = {"Accept": "text/event-stream"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if last:
                headers["Last-Event-ID"] = last
            wait: float | None = None
            try:
                with http.stream("GET", url, params=[("channel", c) for c in wanted], headers=headers) as r:
                    if r.status_code != 200:
                        r.read()
                        if r.status_code < 500 and r.status_code != 429:
                            raise _error(r)
                        wait = retry_after(r.headers.get("Retry-After"))
                        if wait is not None:  # a little jitter: never a tight loop on "0"
                            wait += random.uniform(0.0, 0.25)
                    else:
                        failures = 0
                        for sse in EventSource(r).iter_sse():
                            if sse.id and sse.id == last and sse.data:
                                continue  # the same event again: never hand it out twice
                            if sse.id:
                                last = sse.id
                            if not sse.data:
                                continue  # a position frame: no event
                            yield _to_event(sse, wanted)
            except httpx.TransportError:
                pass  # reconnect below
            failures += 1
            if wait is None:
                wait = min(max_delay, 0.25 * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            time.sleep(wait)
    finally:
        if own:
            http.close()


__all__ = ["Event", "HeraldError", "subscribe"]
