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

from .core import HistoryEvent, Position, Replay, ResumeId, partition_of
from .history import History


@dataclass
class Page:
    events: list[tuple[int, Position, HistoryEvent]]  # (partition, its epoch and the event's seq, event)
    positions: dict[int, Position]  # where to resume from, per partition
    reset: str | None = None

    def last_id(self) -> str:
        """The page's end as a stream id: plain for one partition, else a vector."""
        if len(self.positions) == 1:
            return str(next(iter(self.positions.values())))
        return "_".join(f"{p}.{pos}" for p, pos in sorted(self.positions.items()))

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


def resume_points(after: ResumeId, numbers: Sequence[int]) -> dict[int, Position] | None:
    """The position in each of `numbers` that `after` names, or None if it lacks one."""
    if None in after:
        return {numbers[0]: after[None]} if len(numbers) == 1 else None
    if not all(n in after for n in numbers):
        return None
    return {n: after[n] for n in numbers}


def read_page(
    history: History, channels: Sequence[str], partitions: int, after: ResumeId | None, limit: int
) -> Page:
    """The page: with `after`, the events after it (oldest first, at most `limit`);
    without, the most recent `limit`. A gap history cannot cover is a reset."""
    groups = by_partition(channels, partitions)
    if after is None:
        return _recent(history, groups, limit)
    points = resume_points(after, list(groups))
    if points is None:
        return _reset(history, groups, "unknown_id")
    replays = {p: history.read(p, names, points[p]) for p, names in groups.items()}
    reason = next((r.reset for r in replays.values() if r.reset), None)
    if reason:
        return Page([], {p: Position(r.epoch, r.seq) for p, r in replays.items()}, reason)
    return _first(replays, limit)


def _reset(history: History, groups: dict[int, list[str]], reason: str) -> Page:
    positions = {}
    for p in groups:
        now = history.now(p)
        positions[p] = Position(now.epoch, now.seq)
    return Page([], positions, reason)


def _first(replays: dict[int, Replay], limit: int) -> Page:
    """At most `limit` events after the resume point: whole partitions first, in
    partition order; the partition cut short resumes after its last event."""
    events: list[tuple[int, Position, HistoryEvent]] = []
    positions: dict[int, Position] = {}
    for p, replay in replays.items():
        room = limit - len(events)
        taken = replay.events[:room]
        events += [(p, Position(replay.epoch, e.seq), e) for e in taken]
        if len(taken) == len(replay.events):
            positions[p] = Position(replay.epoch, replay.seq)
        else:
            # Cut short: the rest comes after this page.
            last = taken[-1].seq if taken else _before(replay)
            positions[p] = Position(replay.epoch, last)
    return Page(events, positions)


def _before(replay: Replay) -> int:
    """The position just before a partition's first missed event (none taken)."""
    return replay.events[0].seq - 1 if replay.events else replay.seq


def _recent(history: History, groups: dict[int, list[str]], limit: int) -> Page:
    """The newest `limit` events, shared out between partitions newest first."""
    replays = {p: history.recent(p, names, limit) for p, names in groups.items()}
    newest = {p: list(reversed(r.events)) for p, r in replays.items()}
    keep = dict.fromkeys(replays, 0)
    total = 0
    rank = 0
    while total < limit and any(rank < len(e) for e in newest.values()):
        for p, candidates in newest.items():
            if rank < len(candidates) and total < limit:
                keep[p] += 1
                total += 1
        rank += 1
    events: list[tuple[int, Position, HistoryEvent]] = []
    for p, replay in replays.items():
        chosen = replay.events[len(replay.events) - keep[p] :] if keep[p] else []
        events += [(p, Position(replay.epoch, e.seq), e) for e in chosen]
    return Page(events, {p: Position(r.epoch, r.seq) for p, r in replays.items()})
