"""The core's records: what one worker knows of each partition, channel and
stream, what history returned, what a stream still has to read, and the
queue items of a stream catching up. The core (core.py) changes them; the
adapters read them through the core's accessors, not field by field.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .frames import Payload
from .ids import Position, ResumeId, vector_id


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One event read back from a channel's history stream."""

    seq: int
    channel: str
    event: bytes
    data: bytes


@dataclass(slots=True)
class Replay:
    """History of one partition as read for a stream (or for the worker after a
    reconnect): the missed events, or a reset and why."""

    epoch: str
    seq: int  # the partition's newest sequence number in Redis when history was read
    events: list[HistoryEvent] = field(default_factory=list)
    reset: str | None = None
    # False: a page that stopped short; more events follow its last one.
    complete: bool = True


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Read history for a stream: per partition, events on `channels[p]` after `after[p]`.

    With `check` (a resume), a replay that cannot be complete must come back as
    a reset. Without (a fresh stream), only each partition's current epoch and
    sequence number are needed, not its events.
    """

    channels: dict[int, tuple[str, ...]]
    after: dict[int, Position]
    check: bool


class Partition:
    """One partition as this worker sees it: its connection, epoch and position."""

    __slots__ = (
        "connected",
        "epoch",
        "epoch_b",
        "gap_from",
        "held",
        "number",
        "position",
        "reading_gap",
        "recovering",
        "unconfirmed",
    )

    def __init__(self, number: int) -> None:
        self.number = number
        self.connected = False
        self.recovering = False  # connected, resubscribing and replaying the gap
        self.epoch: str | None = None
        self.epoch_b = b""
        self.position = 0  # the last sequence number dispatched
        self.gap_from: Position | None = None  # where the gap replay starts, if one is due
        self.reading_gap = False  # a ReadGap is out; recovery ends with its gap_read
        self.unconfirmed = 0  # channels with an outstanding SUBSCRIBE during recovery
        self.held: list[tuple[bytes, bytes]] = []  # messages that arrived during recovery

    @property
    def ready(self) -> bool:
        return self.connected and not self.recovering

    def set_epoch(self, epoch: str, seq: int) -> None:
        self.epoch, self.epoch_b, self.position = epoch, epoch.encode(), seq


class ChannelState(enum.Enum):
    SUBSCRIBING = "subscribing"  # a SUBSCRIBE is due or unconfirmed
    CONFIRMED = "confirmed"  # subscribed, but the partition is replaying its gap: not live yet
    LIVE = "live"  # subscribed, and every event after `live_at` comes live


class Channel:
    """One channel of this worker: its partition, its local streams, its subscription."""

    __slots__ = ("key", "live_at", "name", "outstanding", "part", "state", "streams")

    def __init__(self, key: bytes, name: str, part: Partition) -> None:
        self.key = key
        self.name = name
        self.part = part
        self.streams: set[Stream] = set()
        self.state = ChannelState.SUBSCRIBING
        self.outstanding = 0  # SUBSCRIBE commands sent and not confirmed
        self.live_at: int | None = None  # the partition's position when it went live


class StreamState(enum.Enum):
    WAITING = "waiting"  # for its channels to go live
    CATCHING_UP = "catching_up"  # history is being read; live events are queued
    LIVE = "live"  # every event goes to its writer at once
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EventItem:
    """A live event queued for a stream that is catching up."""

    part: int
    seq: int
    id: bytes  # the partition's own id, `<epoch>-<seq>`
    payload: Payload
    size: int  # bytes it counts for in the queue


@dataclass(frozen=True, slots=True)
class ResetItem:
    """A reset queued for a stream that is catching up: it moves partition `part` to `to`."""

    part: int
    to: Position
    frame: bytes
    body: bytes

    @property
    def size(self) -> int:
        return len(self.frame)


Item = EventItem | ResetItem


class Writer(Protocol):
    """What the hub calls on a stream's writer (writer.py: SocketWriter, YieldingWriter)."""

    # 1 if the response is chunked (HTTP/1.1): the hub, fanning one frame out
    # to many writers, hands each `(plain, chunked)[writer.chunked]`.
    chunked: int

    def send(self, data: bytes, /) -> bool:
        """Write `data` (already framed for this writer) or queue it; False if ended."""

    def beat(self) -> None:
        """A heartbeat, if the client is idle (and the slow-client check)."""

    def end(self, frame: bytes = b"", /) -> None:
        """End the response (after `frame`, if any) and close the connection."""


class _Unattached:
    """The writer of a stream not handed to one yet: it takes nothing."""

    __slots__ = ()
    chunked = 0

    def send(self, data: bytes, /) -> bool:
        return False

    def beat(self) -> None:
        pass

    def end(self, frame: bytes = b"", /) -> None:
        pass


UNATTACHED: Writer = _Unattached()


class Stream:
    """One client's stream: its channels, its position in each of their
    partitions, its queue while catching up.

    `writer` belongs to the adapters; the core only carries it along.
    """

    __slots__ = (
        "channels",
        "closed",
        "epochs",
        "expires",
        "history",
        "keys",
        "parts",
        "queue",
        "queue_dropped",
        "queued_bytes",
        "reset",
        "resume",
        "seqs",
        "state",
        "vector",
        "wrap",
        "writer",
    )

    def __init__(
        self,
        channels: Sequence[str],
        resume: ResumeId | Position | None = None,
        expires: float | None = None,
    ) -> None:
        self.channels = tuple(channels)
        self.resume: ResumeId | None = {None: resume} if isinstance(resume, Position) else resume
        self.expires = expires  # when its subscribe token runs out (epoch seconds)
        self.state = StreamState.WAITING
        self.keys: tuple[bytes, ...] = ()  # set by the core on open
        self.parts: tuple[int, ...] = ()  # its partitions, ascending
        self.vector = False  # over several partitions: it carries vector ids
        self.wrap = len(self.channels) > 1  # several channels: each event's data names its channel
        # Per partition, in the order of `parts` (lists: a stream's memory is
        # what bounds a worker): the last position sent (or, while catching up,
        # to send from). `slot` turns a partition number into an index.
        self.epochs: tuple[str, ...] = ()  # immutable and interned: shared by like streams
        self.seqs: list[int] = []
        self.history: HistoryRequest | None = None  # what to read before it goes live
        self.reset: str | None = None  # a reset due before it goes live, and why
        self.queue: deque[Item] = deque()
        self.queued_bytes = 0
        # The queue overflowed since the current history read began: history
        # must be read again before the stream can go live.
        self.queue_dropped = False
        self.closed: str | None = None  # why it ended
        self.writer: Writer = UNATTACHED

    def slot(self, number: int) -> int:
        """The index of partition `number` in `parts`, `epochs` and `seqs`."""
        return self.parts.index(number) if self.vector else 0

    def id(self) -> bytes:
        """The stream's position as its clients see it: the id to resume from."""
        if not self.vector:
            return f"{self.epochs[0]}-{self.seqs[0]}".encode()
        return vector_id(zip(self.parts, self.epochs, self.seqs, strict=True)).encode()

    @property
    def position(self) -> Position:
        """Its position in its first partition (all of it, for a single-partition stream)."""
        return Position(self.epochs[0], self.seqs[0])

    def __repr__(self) -> str:
        at = self.id().decode() if self.epochs else "-"
        return f"<Stream {','.join(self.channels)} {self.state.value} at {at}>"
