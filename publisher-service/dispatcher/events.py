"""Webhook events as the dispatcher reads them from a lane and sends them.

A lane entry holds `type`, `channel` and `time` (ms, when the transition
happened), written by occupancy.py's scripts; an entry put back by a replay
also holds the event's `id` and the `endpoint` (consumer group) it is for.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """One occupancy event, read from a lane."""

    entry: str  # the lane entry's id
    id: str  # the event's id: webhook-id, the same on every delivery
    type: str
    channel: str
    time_ms: int
    endpoint: str | None = None  # a replayed event: only for this consumer group

    @property
    def created_ms(self) -> int:
        """When the entry was written (its id's time): the retry window runs from it."""
        return int(self.entry.split("-", 1)[0])

    def as_json(self) -> dict[str, object]:
        """The event as sent: Standard Webhooks' type, timestamp and data, plus its id."""
        return {
            "id": self.id,
            "type": self.type,
            "timestamp": iso(self.time_ms),
            "data": {"channel": self.channel},
        }


def event_id(partition: int, lane: int, entry: str) -> str:
    """The id of an event written by occupancy.py: unique per partition, lane and entry."""
    return f"hk_{partition}_{lane}_{entry}"


def from_entry(partition: int, lane: int, entry: str, fields: dict[bytes, bytes]) -> Event:
    """The event a lane entry holds; ValueError if it is malformed."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    return Event(
        entry=entry,
        id=text.get("id") or event_id(partition, lane, entry),
        type=text["type"],
        channel=text["channel"],
        time_ms=int(text["time"]),
        endpoint=text.get("endpoint"),
    )


def body(events: list[Event], batched: bool) -> tuple[str, bytes]:
    """The webhook-id and the JSON body of one POST: one event, or a batch of them.

    A batch's id is made of its first event's id and its size: the same events
    read again after a takeover (a lane's pending entries) make the same batch.
    """
    if not batched:
        (event,) = events
        return event.id, _dumps(event.as_json())
    batch = {
        "type": "batch",
        "timestamp": iso(events[0].time_ms),
        "data": {"events": [e.as_json() for e in events]},
    }
    return f"batch_{events[0].id}_{len(events)}", _dumps(batch)


def iso(ms: int) -> str:
    """RFC 3339 UTC with milliseconds: 2026-12-04T22:10:36.123Z."""
    at = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
