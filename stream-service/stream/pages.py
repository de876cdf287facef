"""`GET /history`: recent or missed events as one JSON page, and the position
to open `/stream` from afterwards, so that "load from history, then stream
live" has no gap and no duplicate.

Per partition the page holds a run of consecutive events, read atomically with
the partition's position; `last_id` is, per partition, the last event the page
holds, or the partition's position when the page holds all of it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .contract import partition_of
from .history import History
from .ids import Position, ResumeId, resume_points, vector_id
from .records import HistoryEvent

# The most data one /history answer holds (it holds at least one event): with
# `limit` up to 1000 and events up to MAX_EVENT_BYTES, a page could otherwise
# be 64 MiB. A client pages on from `last_id`.
PAGE_BYTES = 1 << 20


@dataclass
class Page:
    events: list[tuple[int, Position, HistoryEvent]]  # (partition, its epoch and the event's seq, event)
    positions: dict[int, Position]  # where to resume from, per partition
    reset: str | None = None

    def last_id(self) -> str:
        """The page's end as a stream id: plain for one partition, else a vector."""
        if len(self.positions) == 1:
            return str(next(iter(self.positions.values())))
        return vector_id((p, pos.epoch, pos.seq) for p, pos in sorted(self.positions.items()))

    def as_json(self) -> dict[str, Any]:
        return {
            "events": [
                {
                    "id": str(at),
                    "channel": e.channel,
                    "event": e.event.decode(),
                    "data": json.loads(e.data),
                }
                for _, at, e in self.events
            ],
            "last_id": self.last_id(),
            "reset": self.reset,
        }


def by_partition(channels: Sequence[str], partitions: int) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for channel in channels:
        out.setdefault(partition_of(channel, partitions), []).append(channel)
    return dict(sorted(out.items()))


def read_page(
    history: History, channels: Sequence[str], partitions: int, after: ResumeId | None, limit: int
) -> Page:
    """The page: with `after`, the events after it (oldest first, at most `limit`);
    without, the most recent `limit`. A gap history cannot cover is a reset.

    Redis reads no more than the page holds (plus a few entries of look-ahead),
    and the page holds no more than PAGE_BYTES of data (at least one event).
    """
    groups = by_partition(channels, partitions)
    if after is None:
        return _recent(history, groups, limit)
    points = resume_points(after, list(groups))
    if points is None:
        return _reset(history, groups, "unknown_id")
    events: list[tuple[int, Position, HistoryEvent]] = []
    positions: dict[int, Position] = {}
    room, budget = limit, PAGE_BYTES
    # Whole partitions first, in partition order; the one cut short resumes
    # after its last event, the ones not reached from where they were.
    for p, names in groups.items():
        if room <= 0 or budget <= 0:
            positions[p] = points[p]
            continue
        replay = history.page(p, names, after=points[p], most=room, budget=budget)
        if replay.reset:
            return _reset(history, groups, replay.reset)
        events += [(p, Position(replay.epoch, e.seq), e) for e in replay.events]
        room -= len(replay.events)
        budget -= _size(replay.events)
        last = replay.events[-1].seq if replay.events and not replay.complete else replay.seq
        positions[p] = Position(replay.epoch, last)
    return Page(events, positions)


def _size(events: Sequence[HistoryEvent]) -> int:
    """Bytes of data as the read script counts them."""
    return sum(len(e.event) + len(e.data) for e in events)


def _reset(history: History, groups: dict[int, list[str]], reason: str) -> Page:
    positions = {}
    for p in groups:
        now = history.now(p)
        positions[p] = Position(now.epoch, now.seq)
    return Page([], positions, reason)


def _recent(history: History, groups: dict[int, list[str]], limit: int) -> Page:
    """The newest `limit` events: each partition's share first, then what its
    share left over to the partitions that have more (older) events."""
    share, bytes_share = -(-limit // len(groups)), PAGE_BYTES // len(groups)
    first = {p: history.page(p, names, most=share, budget=bytes_share) for p, names in groups.items()}
    room = limit - sum(len(r.events) for r in first.values())
    budget = PAGE_BYTES - sum(_size(r.events) for r in first.values())
    older: dict[int, list[HistoryEvent]] = {}
    for p, replay in first.items():
        if room <= 0 or budget <= 0 or replay.complete or not replay.events:
            continue
        more = history.page(p, groups[p], before=replay.events[0].seq, most=room, budget=budget)
        older[p] = more.events
        room -= len(more.events)
        budget -= _size(more.events)
    events: list[tuple[int, Position, HistoryEvent]] = []
    for p, replay in first.items():
        run = older.get(p, []) + replay.events
        events += [(p, Position(replay.epoch, e.seq), e) for e in run]
    return Page(events, {p: Position(r.epoch, r.seq) for p, r in first.items()})
