"""Event ids, as clients send them back and as the service writes them.

A stream whose channels lie in one partition carries that partition's ids,
`<epoch>-<seq>` (a `Position`). A stream over several partitions carries a
vector id, its position in each: `<p>.<epoch>-<seq>` entries, by ascending
partition, joined by `_`. `/history`'s `last_id` is written the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PLAIN_ID_RE = re.compile(r"([0-9a-f]{12})-([0-9]{1,18})")
ENTRY_ID_RE = re.compile(r"([0-9]{1,4})\.([0-9a-f]{12})-([0-9]{1,18})")
MAX_ID_ENTRIES = 64


class BadEventId(ValueError):
    """A Last-Event-ID / lastEventId that is neither form of an event id."""


@dataclass(frozen=True, slots=True)
class Position:
    """A point in one partition's event sequence: its epoch and a sequence number."""

    epoch: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse a plain event id, `<epoch>-<seq>`; raise BadEventId otherwise."""
        match = PLAIN_ID_RE.fullmatch(text.strip())
        if not match:
            raise BadEventId("the last event id must look like <12 hex digits>-<number>")
        return cls(match[1], int(match[2]))

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


# A resume point as the client sent it: a plain id (partition None, to be
# matched with the stream's one partition), or a vector {partition: position}.
ResumeId = dict[int | None, Position]


def parse_event_id(text: str) -> ResumeId:
    """Parse a Last-Event-ID: `<epoch>-<seq>`, or `<p>.<epoch>-<seq>` entries joined by `_`."""
    text = text.strip()
    match = PLAIN_ID_RE.fullmatch(text)
    if match:
        return {None: Position(match[1], int(match[2]))}
    entries = text.split("_")
    out: ResumeId = {}
    for entry in entries[:MAX_ID_ENTRIES]:
        match = ENTRY_ID_RE.fullmatch(entry)
        if not match or int(match[1]) in out:
            break
        out[int(match[1])] = Position(match[2], int(match[3]))
    else:
        if len(entries) <= MAX_ID_ENTRIES:
            return out
    raise BadEventId(
        "the last event id must be an id this service sent: <12 hex digits>-<number>, "
        f"or up to {MAX_ID_ENTRIES} entries <partition>.<12 hex digits>-<number> joined by _"
    )


def vector_id(entries: Iterable[tuple[int, str, int]]) -> str:
    """A vector id from (partition, epoch, seq) entries, given by ascending partition."""
    return "_".join(f"{p}.{epoch}-{seq}" for p, epoch, seq in entries)


def resume_points(resume: ResumeId, parts: Sequence[int]) -> dict[int, Position] | None:
    """The position in each of `parts` that `resume` names, or None if it lacks one.

    A plain id names the position in a single partition; it fits only a
    stream (or a page) over one.
    """
    if None in resume:
        return {parts[0]: resume[None]} if len(parts) == 1 else None
    if not all(p in resume for p in parts):
        return None
    return {p: resume[p] for p in parts}
