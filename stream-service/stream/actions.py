"""The core's actions: what each of its inputs tells the adapters to do.

hub.py carries every one out (`Hub._do`): Redis commands for `Subscribe`,
`Unsubscribe` and `ReadGap`, a waiting opener woken for `Ready`, bytes to the
writers for `Deliver`, `Reset`, `Beat` and `End`, a log line for `Malformed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ids import Position
from .records import Stream


@dataclass(frozen=True, slots=True)
class Subscribe:
    partition: int
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    partition: int
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ReadGap:
    """Read what was published on `channels` of `partition` after `after` while away."""

    partition: int
    channels: tuple[str, ...]
    after: Position


@dataclass(frozen=True, slots=True)
class Ready:
    """`stream`'s channels are live: read `stream.history` (if any), then call caught_up."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class Deliver:
    """Write `frame` (one event) to each of `streams`, which are live."""

    frame: bytes
    streams: list[Stream]


@dataclass(frozen=True, slots=True)
class Reset:
    """Write `frame` (a reset event) to each of `streams`, which are live."""

    reason: str
    frame: bytes
    streams: list[Stream]


@dataclass(frozen=True, slots=True)
class Beat:
    """Write a heartbeat to each of `streams`, which are live."""

    streams: list[Stream]


@dataclass(frozen=True, slots=True)
class End:
    """`stream` is over (it left the core with this action): write `frame` (if
    any), end the response, close the socket, count it by `reason`."""

    stream: Stream
    reason: str
    frame: bytes = b""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A Pub/Sub message that does not follow the contract: log it, skip it."""

    key: bytes


Action = Subscribe | Unsubscribe | ReadGap | Ready | Deliver | Reset | Beat | End | Malformed
