"""The stream service's core: every partition, channel and stream of one worker,
and every decision about them, with no I/O (no gevent, no sockets, no redis-py).

Inputs are method calls: a stream opens or leaves, Redis confirms a
subscription, a message arrives, a partition's connection is lost or back,
history was read, a tick. Each returns what to do, as actions (`Subscribe`,
`Deliver`, `Reset`, ...), which the adapters carry out: `hub.py` (Redis
Pub/Sub, timers) and `writer.py` (one writer per stream, the only code that
touches its socket).

The rules, in one place:
- Channels are hashed into partitions (docs/redis-contract.md); each partition
  has its own epoch and sequence, and its own connection state here: it is
  connected or not, recovering (resubscribing and replaying its gap) or live.
- A channel is subscribed in Redis while it has local streams, or while a
  SUBSCRIBE for it is unconfirmed (its confirmation then unsubscribes it).
- Sequence numbers increase within a partition's epoch. The core drops a
  message at or below its partition's position (already dispatched from
  history after a reconnect); a stream drops one at or below its own position
  in that partition (already sent to it from history while it caught up).
  Nowhere else is anything dropped.
- A stream is WAITING until its channels are live, CATCHING_UP while the
  adapter reads its history page by page (live events are queued for it
  meanwhile; when the queue passes its bound it is dropped, and history, which
  holds every event queued, is read on until it covers the drop), then LIVE:
  each event goes to its writer as it arrives.
- A stream whose channels lie in one partition carries that partition's ids,
  `<epoch>-<seq>`, and every such stream gets the very same bytes per event.
  A stream over several partitions carries a vector id, its position in each.
"""

from __future__ import annotations

import enum
import heapq
import json
import re
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import sse

PLAIN_ID_RE = re.compile(r"([0-9a-f]{12})-([0-9]{1,18})")
ENTRY_ID_RE = re.compile(r"([0-9]{1,4})\.([0-9a-f]{12})-([0-9]{1,18})")
MAX_ID_ENTRIES = 64
PREAMBLE_COMMENT = sse.comment(b"ok")
HEARTBEAT = sse.comment(b"hb")
TOKEN_EXPIRED = sse.frame(json.dumps({"reason": "token_expired"}).encode(), event=b"token_expired")


# -- partitions and keys ----------------------------------------------------------


def partition_of(channel: str, partitions: int) -> int:
    """The channel's partition: CRC-32 of its name, modulo the partition count."""
    return zlib.crc32(channel.encode()) % partitions


def tag(partition: int) -> str:
    """The hash tag prefix of every key of `partition`."""
    return f"herald:{{p{partition}}}"


def live_key(channel: str, partition: int) -> bytes:
    """The sharded Pub/Sub channel that carries `channel`'s events."""
    return f"{tag(partition)}:live:{channel}".encode()


# -- positions and frames -------------------------------------------------------


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


def event_body(event: bytes, data: bytes) -> bytes:
    """An event's frame without its id line: event, data (line separators escaped), blank line."""
    return sse.frame(sse.json_data(data), event=event)


def with_id(id: bytes, body: bytes) -> bytes:
    """A frame: the `id:` line, then the body (ids are built here, never from input)."""
    return b"id: " + id + b"\n" + body


def reset_body(reason: str) -> bytes:
    """A `reset` event without its id: history cannot cover the gap."""
    return sse.frame(json.dumps({"reason": reason}).encode(), event=b"reset")


def envelope(channel: str, data: bytes) -> bytes:
    """The data of an event on a multi-channel stream: the channel, then the data."""
    return b'{"channel":"' + channel.encode() + b'","data":' + data + b"}"


class Payload:
    """One event's bodies (frames without an id line), each built once, when first needed:
    as single-channel streams get it, and wrapped with its channel for multi-channel streams."""

    __slots__ = ("_plain", "_wrapped", "channel", "data", "event")

    def __init__(self, channel: str, event: bytes, data: bytes, plain: bytes | None = None) -> None:
        self.channel, self.event, self.data = channel, event, data
        self._plain = plain
        self._wrapped: bytes | None = None

    def plain(self) -> bytes:
        if self._plain is None:
            self._plain = event_body(self.event, self.data)
        return self._plain

    def wrapped(self) -> bytes:
        if self._wrapped is None:
            self._wrapped = event_body(self.event, envelope(self.channel, self.data))
        return self._wrapped

    def body_for(self, stream: Stream) -> bytes:
        return self.wrapped() if stream.wrap else self.plain()


# -- errors -------------------------------------------------------------------


class Unavailable(Exception):
    """The worker cannot serve a new stream now (Redis unreachable, shutting down)."""


class Full(Unavailable):
    """The worker holds MAX_CONNECTIONS streams already."""

    def __init__(self) -> None:
        super().__init__("this worker is at its connection limit")


# -- records ------------------------------------------------------------------


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
        self.writer: Any = None

    def slot(self, number: int) -> int:
        """The index of partition `number` in `parts`, `epochs` and `seqs`."""
        return self.parts.index(number) if self.vector else 0

    def id(self) -> bytes:
        """The stream's position as its clients see it: the id to resume from."""
        if not self.vector:
            return f"{self.epochs[0]}-{self.seqs[0]}".encode()
        entries = zip(self.parts, self.epochs, self.seqs, strict=True)
        return "_".join(f"{p}.{epoch}-{seq}" for p, epoch, seq in entries).encode()

    @property
    def position(self) -> Position:
        """Its position in its first partition (all of it, for a single-partition stream)."""
        return Position(self.epochs[0], self.seqs[0])

    def __repr__(self) -> str:
        at = self.id().decode() if self.epochs else "-"
        return f"<Stream {','.join(self.channels)} {self.state.value} at {at}>"


# -- actions ------------------------------------------------------------------


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


# -- the core -----------------------------------------------------------------


class Core:
    """The state of one worker's partitions, channels and streams, and its transitions."""

    def __init__(
        self, *, max_streams: int, queue_limit_bytes: int, retry_ms: int, partitions: int = 1
    ) -> None:
        self.max_streams = max_streams
        self.queue_limit_bytes = queue_limit_bytes
        self.preamble = PREAMBLE_COMMENT + sse.retry(retry_ms)
        self.parts = [Partition(p) for p in range(partitions)]
        self.channels: dict[bytes, Channel] = {}
        self.streams: set[Stream] = set()
        self.stopping = False
        self._expiries: list[tuple[float, int, Stream]] = []  # heap of token expiries
        # Interned `Stream.parts` and `Stream.epochs`: one tuple shared by like streams.
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._epoch_sets: dict[tuple[str, ...], tuple[str, ...]] = {}

    # -- gauges -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Every partition has its connection."""
        return all(p.connected for p in self.parts)

    @property
    def ready(self) -> bool:
        """Every partition is connected and not replaying a gap: new streams can go live."""
        return all(p.ready for p in self.parts)

    @property
    def epoch(self) -> str | None:
        """Partition 0's epoch (the only one with PARTITIONS=1)."""
        return self.parts[0].epoch

    @property
    def position(self) -> int:
        """Partition 0's position (the only one with PARTITIONS=1)."""
        return self.parts[0].position

    def live_channels(self) -> int:
        return sum(1 for c in self.channels.values() if c.state is ChannelState.LIVE)

    def channels_of(self, part: Partition) -> list[Channel]:
        return [c for c in self.channels.values() if c.part is part]

    # -- streams ------------------------------------------------------------

    def open(self, stream: Stream) -> list[Action]:
        """A client opens `stream`. Raises Full or Unavailable (then nothing changed)."""
        if self.stopping:
            raise Unavailable("the worker is shutting down")
        if len(self.streams) >= self.max_streams:
            raise Full()
        count = len(self.parts)
        numbers = [partition_of(c, count) for c in stream.channels]
        parts = tuple(sorted(set(numbers)))
        stream.parts = self._shapes.setdefault(parts, parts)  # one tuple shared by like streams
        stream.vector = len(parts) > 1
        self.streams.add(stream)
        if stream.expires is not None:
            heapq.heappush(self._expiries, (stream.expires, id(stream), stream))
        to_send: dict[int, list[bytes]] = {}
        keys = []
        for name, number in zip(stream.channels, numbers, strict=True):
            key = live_key(name, number)
            channel = self.channels.get(key)
            if channel is None:
                part = self.parts[number]
                channel = self.channels[key] = Channel(key, name, part)
                if part.connected:
                    channel.outstanding = 1
                    to_send.setdefault(number, []).append(key)
                    if part.recovering:
                        part.unconfirmed += 1
            channel.streams.add(stream)
            keys.append(channel.key)  # the channel's own bytes, shared by its streams
        stream.keys = tuple(keys)
        actions: list[Action] = [Subscribe(p, tuple(keys)) for p, keys in to_send.items()]
        if self._all_live(stream):
            actions.append(self._make_ready(stream))
        return actions

    def leave(self, stream: Stream, reason: str = "gone", frame: bytes = b"") -> list[Action]:
        """`stream` is over (the client left, its writer failed, it timed out...).

        Idempotent. Ends the stream (after `frame`, if any) and unsubscribes
        the channels it was the last local stream of.
        """
        if stream.state is StreamState.CLOSED:
            return []
        stream.state = StreamState.CLOSED
        stream.closed = reason
        stream.queue.clear()
        stream.queued_bytes = 0
        self.streams.discard(stream)
        gone: dict[int, list[bytes]] = {}
        for key in stream.keys:
            channel = self.channels.get(key)
            if channel is None:
                continue
            channel.streams.discard(stream)
            if channel.streams:
                continue
            if channel.outstanding:
                continue  # subscribed in Redis soon: its confirmation unsubscribes it
            del self.channels[key]
            if channel.part.connected and channel.state is not ChannelState.SUBSCRIBING:
                gone.setdefault(channel.part.number, []).append(key)
        actions: list[Action] = [End(stream, reason, frame)]
        return actions + [Unsubscribe(p, tuple(keys)) for p, keys in gone.items()]

    def caught_up(self, stream: Stream, replays: dict[int, Replay] | None) -> bytes:
        """History was read for `stream` (None: none was needed): what to write first.

        The preamble, then the replayed events (or a reset). If that was the
        whole gap, also the live events queued meanwhile that the replay did
        not cover, and the stream is LIVE; else it stays CATCHING_UP and
        `next_read` says what to read for `replayed`.
        """
        if stream.state is StreamState.CLOSED:
            # It ended while catching up (its token expired, its client left).
            return self.preamble + (TOKEN_EXPIRED if stream.closed == "token_expired" else b"")
        assert stream.state is StreamState.CATCHING_UP
        out = [self.preamble]
        replays = replays or {}
        if stream.resume is None and not stream.reset:
            # A fresh stream on a channel that just went live starts where Redis
            # was once it did (read after the SUBSCRIBE took effect): everything
            # later comes live, and nothing from before the stream opened.
            for number, replay in replays.items():
                i = stream.slot(number)
                stream.seqs[i] = max(stream.seqs[i], replay.seq)
            # The id-only frame lets the browser resume from here even if the
            # stream drops before any event.
            out.append(sse.position(stream.id()))
        else:
            self._replay(stream, replays, out, stream.reset)
        return self._settle(stream, replays, out)

    def next_read(self, stream: Stream) -> HistoryRequest | None:
        """What to read next for `stream` while it catches up (None: nothing).

        Call it as the read begins. A read of every partition's events from the
        stream's position covers a queue dropped before it; an overflow from
        then on asks for another.
        """
        request = stream.history if stream.state is StreamState.CATCHING_UP else None
        if request is not None and request.check and len(request.after) == len(stream.parts):
            stream.queue_dropped = False
        return request

    def replayed(self, stream: Stream, replays: dict[int, Replay]) -> bytes:
        """The next page of `stream`'s history was read: what to write next, as
        `caught_up` but without the preamble."""
        if stream.state is StreamState.CLOSED:
            return b""  # its End carried the last frame
        out: list[bytes] = []
        self._replay(stream, replays, out, None)
        return self._settle(stream, replays, out)

    def _replay(
        self, stream: Stream, replays: dict[int, Replay], out: list[bytes], reset: str | None
    ) -> None:
        """Append the frames of `replays` for `stream`, or one reset if they cannot be complete."""
        for number, replay in replays.items():
            if replay.reset or replay.epoch != stream.epochs[stream.slot(number)]:
                reset = reset or replay.reset or "epoch_changed"
        if reset:
            for number, replay in replays.items():
                self._move(stream, stream.slot(number), replay.epoch, replay.seq)
            out.append(with_id(stream.id(), reset_body(reset)))
            return
        for number, replay in sorted(replays.items()):
            epoch = replay.epoch.encode()
            i = stream.slot(number)
            for e in replay.events:
                if e.seq > stream.seqs[i]:
                    stream.seqs[i] = e.seq
                    data = envelope(e.channel, e.data) if stream.wrap else e.data
                    body = event_body(e.event, data)
                    out.append(with_id(stream.id() if stream.vector else epoch + b"-%d" % e.seq, body))

    def _settle(self, stream: Stream, replays: dict[int, Replay], out: list[bytes]) -> bytes:
        """Go live if the replay covered the whole gap, else ask for the next page."""
        short = [n for n, r in replays.items() if not r.complete]
        stream.reset = None
        if short or stream.queue_dropped:
            # The queue, when dropped, lacks events only history still has:
            # every partition is read on from where the stream is.
            by_part = self._channels_by_part(stream)
            numbers = stream.parts if stream.queue_dropped else short
            after = {n: Position(stream.epochs[stream.slot(n)], stream.seqs[stream.slot(n)]) for n in numbers}
            stream.history = HistoryRequest({n: by_part[n] for n in numbers}, after, check=True)
            return b"".join(out)
        for item in stream.queue:
            frame = self._admit(stream, item)
            if frame is not None:
                out.append(frame)
        stream.queue.clear()
        stream.queued_bytes = 0
        stream.history = None
        stream.state = StreamState.LIVE
        return b"".join(out)

    def _channels_by_part(self, stream: Stream) -> dict[int, tuple[str, ...]]:
        """The stream's channel names, by partition."""
        by_part: dict[int, tuple[str, ...]] = {}
        for key in stream.keys:
            channel = self.channels[key]
            number = channel.part.number
            by_part[number] = (*by_part.get(number, ()), channel.name)
        return by_part

    def _admit(self, stream: Stream, item: Item) -> bytes | None:
        """The frame `stream` gets for a queued item, or None if it has it already."""
        i = stream.slot(item.part)
        if isinstance(item, ResetItem):
            if item.to.epoch == stream.epochs[i]:
                return None  # it reset to this epoch while catching up
            self._move(stream, i, item.to.epoch, item.to.seq)
        else:
            if item.seq <= stream.seqs[i]:
                return None
            stream.seqs[i] = item.seq
        if isinstance(item, ResetItem):
            return with_id(stream.id(), item.body) if stream.vector else item.frame
        return with_id(stream.id() if stream.vector else item.id, item.payload.body_for(stream))

    def _interned(self, epochs: tuple[str, ...]) -> tuple[str, ...]:
        return self._epoch_sets.setdefault(epochs, epochs)

    def _move(self, stream: Stream, i: int, epoch: str, seq: int) -> None:
        """Set the stream's position in the partition at index `i`."""
        if stream.epochs[i] != epoch:
            epochs = list(stream.epochs)
            epochs[i] = epoch
            stream.epochs = self._interned(tuple(epochs))
        stream.seqs[i] = seq

    def _all_live(self, stream: Stream) -> bool:
        channels = self.channels
        return all(channels[k].state is ChannelState.LIVE for k in stream.keys)

    def _make_ready(self, stream: Stream) -> Ready:
        """`stream`'s channels are all live: it starts catching up from here."""
        stream.state = StreamState.CATCHING_UP
        epochs, seqs = [], []
        for number in stream.parts:
            part = self.parts[number]
            assert part.epoch is not None
            epochs.append(part.epoch)
            seqs.append(part.position)
        stream.epochs, stream.seqs = self._interned(tuple(epochs)), seqs
        by_part = self._channels_by_part(stream)
        if stream.resume is not None:
            after = self._resume_points(stream)
            if after is None:
                # It names none of (or not all) its partitions: start from now, said as a reset.
                stream.reset = "unknown_id"
            else:
                stream.history = HistoryRequest(by_part, after, check=True)
                for number, position in after.items():
                    i = stream.slot(number)
                    self._move(stream, i, position.epoch, position.seq)
        else:
            # A channel live so recently that no event has been dispatched
            # since: the worker's position may be older than the moment Redis
            # ran its SUBSCRIBE, and events in between never come live. The
            # stream starts from where Redis is after that moment instead
            # (`caught_up`), so the adapter reads that partition's position.
            recent = {
                c.part.number for c in (self.channels[k] for k in stream.keys) if c.live_at == c.part.position
            }
            if recent:
                slots = {p: stream.slot(p) for p in recent}
                after = {p: Position(stream.epochs[i], stream.seqs[i]) for p, i in slots.items()}
                stream.history = HistoryRequest({p: by_part[p] for p in recent}, after, check=False)
        return Ready(stream)

    @staticmethod
    def _resume_points(stream: Stream) -> dict[int, Position] | None:
        """The stream's resume position in each of its partitions, or None if the id lacks one."""
        resume = stream.resume
        assert resume is not None
        if None in resume:
            return {stream.parts[0]: resume[None]} if not stream.vector else None
        if not all(p in resume for p in stream.parts):
            return None
        return {p: resume[p] for p in stream.parts}

    # -- the Pub/Sub connection -------------------------------------------

    def connection_up(self, number: int, epoch: str, seq: int) -> list[Action]:
        """Partition `number` is connected; its current epoch and sequence are `epoch`, `seq`.

        Resubscribes its channels; messages are held until the gap since its
        last position is replayed from history.
        """
        part = self.parts[number]
        actions: list[Action] = []
        part.connected = True
        part.recovering = True
        part.held = []
        resumed = part.epoch is not None
        if part.epoch is not None and (epoch != part.epoch or seq < part.position):
            actions += self._change_epoch(part, "epoch_changed", Position(epoch, seq))
            resumed = False
        if not resumed:
            part.set_epoch(epoch, seq)
        part.gap_from = Position(epoch, part.position) if resumed else None
        channels = self.channels_of(part)
        for channel in channels:
            channel.state = ChannelState.SUBSCRIBING
            channel.outstanding = 1
        part.unconfirmed = len(channels)
        if channels:
            actions.append(Subscribe(number, tuple(c.key for c in channels)))
        return actions + self._recovery_step(part)

    def connection_lost(self, numbers: Iterable[int] | None = None) -> list[Action]:
        """The connection of these partitions (default: all) broke: their
        subscriptions are gone with it."""
        lost = {self.parts[n] for n in numbers} if numbers is not None else set(self.parts)
        for part in lost:
            part.connected = False
            part.recovering = False
            part.reading_gap = False
            part.held = []
            part.gap_from = None
        for key, channel in list(self.channels.items()):
            if channel.part not in lost:
                continue
            if not channel.streams:
                del self.channels[key]
                continue
            channel.state = ChannelState.SUBSCRIBING
            channel.outstanding = 0
            channel.live_at = None
        return []

    def confirmed(self, key: bytes) -> list[Action]:
        """Redis confirmed a SUBSCRIBE of `key`."""
        channel = self.channels.get(key)
        if channel is None or channel.outstanding == 0:
            return []  # not ours (any more): nothing to do
        channel.outstanding -= 1
        if channel.outstanding:
            return []
        part = channel.part
        if not channel.streams:
            del self.channels[key]  # its last stream left while it was pending
            unsubscribe = Unsubscribe(part.number, (key,))
            if part.recovering:
                part.unconfirmed -= 1
                return [unsubscribe, *self._recovery_step(part)]
            return [unsubscribe]
        if part.recovering:
            channel.state = ChannelState.CONFIRMED
            part.unconfirmed -= 1
            return self._recovery_step(part)
        return self._go_live(part, [channel])

    def _recovery_step(self, part: Partition) -> list[Action]:
        """After (re)connecting: replay the gap once every channel is confirmed."""
        if not part.recovering or part.unconfirmed > 0 or part.reading_gap:
            return []
        channels = self.channels_of(part)
        if part.gap_from is not None and channels:
            gap, part.gap_from = part.gap_from, None
            part.reading_gap = True
            return [ReadGap(part.number, tuple(c.name for c in channels), gap)]
        return self.gap_read(part.number, None)

    def gap_read(self, number: int, replay: Replay | None) -> list[Action]:
        """The gap of a partition after a reconnect was read (None: no gap):
        dispatch it, then the messages held meanwhile, and go live. A page that
        stopped short is dispatched and the rest asked for (ReadGap)."""
        part = self.parts[number]
        actions: list[Action] = []
        part.reading_gap = False
        if replay is not None:
            epoch = replay.epoch.encode()
            for e in replay.events:
                if e.seq <= part.position or epoch != part.epoch_b:
                    continue
                key = live_key(e.channel, number)
                bodies = Payload(e.channel, e.event, e.data)
                actions += self._dispatch(part, key, e.seq, b"%d" % e.seq, bodies)
            if not replay.complete and epoch == part.epoch_b:
                # One page of the gap: read on from its last event before going live.
                assert part.epoch is not None
                part.reading_gap = True
                names = tuple(c.name for c in self.channels_of(part))
                return [*actions, ReadGap(number, names, Position(part.epoch, part.position))]
        part.recovering = False
        held, part.held = part.held, []
        for key, payload in held:
            actions += self.message(key, payload)
        confirmed = [c for c in self.channels_of(part) if c.state is ChannelState.CONFIRMED]
        return actions + self._go_live(part, confirmed)

    def _go_live(self, part: Partition, channels: Iterable[Channel]) -> list[Action]:
        actions: list[Action] = []
        for channel in channels:
            channel.state = ChannelState.LIVE
            channel.live_at = part.position
            for stream in channel.streams:
                if stream.state is StreamState.WAITING and self._all_live(stream):
                    actions.append(self._make_ready(stream))
        return actions

    # -- messages -------------------------------------------------------------

    def message(self, key: bytes, payload: bytes) -> list[Action]:
        """A Pub/Sub message `payload` (`<epoch> <seq> <event> <data>`) on `key`."""
        channel = self.channels.get(key)
        part = channel.part if channel is not None else self._part_of_key(key)
        if part is None:
            return [Malformed(key)]
        if part.recovering:
            part.held.append((key, payload))
            return []
        try:
            epoch, seqb, event, data = payload.split(b" ", 3)
            seq = int(seqb)
            body = event_body(event, data)  # checks the event name, too
        except ValueError:
            return [Malformed(key)]
        actions: list[Action] = []
        if epoch != part.epoch_b:
            # Redis lost the partition's data while we stayed connected: a new epoch began.
            actions += self._change_epoch(part, "epoch_changed", Position(epoch.decode(), seq - 1))
            part.set_epoch(epoch.decode(), 0)
        if seq <= part.position:
            return actions  # already dispatched from history during recovery
        name = channel.name if channel is not None else ""
        return actions + self._dispatch(part, key, seq, seqb, Payload(name, event, data, body))

    def _part_of_key(self, key: bytes) -> Partition | None:
        """The partition named by a live key's hash tag (None if it names none of ours)."""
        try:
            number = int(key[key.index(b"{p") + 2 : key.index(b"}")])
            return self.parts[number]
        except (ValueError, IndexError):
            return None

    def _dispatch(self, part: Partition, key: bytes, seq: int, seqb: bytes, payload: Payload) -> list[Action]:
        part.position = seq
        channel = self.channels.get(key)
        if channel is None:
            return []
        number = part.number
        event_id = part.epoch_b + b"-" + seqb
        live = []  # single-channel streams: the plain frame
        wrapped = []  # multi-channel streams in one partition: the wrapped frame
        actions: list[Action] = []
        for stream in channel.streams:
            state = stream.state
            if state is StreamState.LIVE:
                i = stream.slot(number)
                if seq > stream.seqs[i]:
                    stream.seqs[i] = seq
                    if stream.vector:
                        actions.append(Deliver(with_id(stream.id(), payload.wrapped()), [stream]))
                    elif stream.wrap:
                        wrapped.append(stream)
                    else:
                        live.append(stream)
            elif state is StreamState.CATCHING_UP:
                size = len(event_id) + len(payload.data) + 32
                self._enqueue(stream, EventItem(number, seq, event_id, payload, size))
        if live:
            actions.append(Deliver(with_id(event_id, payload.plain()), live))
        if wrapped:
            actions.append(Deliver(with_id(event_id, payload.wrapped()), wrapped))
        return actions

    def _enqueue(self, stream: Stream, item: Item) -> None:
        """Queue `item` for a stream catching up. Past the bound the queue is
        dropped: history holds every event in it (and a changed epoch shows
        there too), so the stream reads history again before it goes live."""
        stream.queue.append(item)
        stream.queued_bytes += item.size
        if stream.queued_bytes > self.queue_limit_bytes:
            stream.queue.clear()
            stream.queued_bytes = 0
            stream.queue_dropped = True

    def _change_epoch(self, part: Partition, reason: str, to: Position) -> list[Action]:
        """Every stream of `part` not on epoch `to.epoch` yet is told to reset to `to` there."""
        number = part.number
        body = reset_body(reason)
        frame = with_id(str(to).encode(), body)
        live = []
        actions: list[Action] = []
        for stream in self.streams:
            if number not in stream.parts or not stream.epochs:
                continue
            i = stream.slot(number)
            if stream.epochs[i] == to.epoch:
                continue
            if stream.state is StreamState.LIVE:
                self._move(stream, i, to.epoch, to.seq)
                if stream.vector:
                    actions.append(Reset(reason, with_id(stream.id(), body), [stream]))
                else:
                    live.append(stream)
            elif stream.state is StreamState.CATCHING_UP:
                self._enqueue(stream, ResetItem(number, to, frame, body))
        if live:
            actions.append(Reset(reason, frame, live))
        return actions

    # -- time and the end ---------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """The heartbeat interval passed: a heartbeat for every live stream, and
        the end for streams whose token expired by `now`."""
        actions: list[Action] = self.expire(now)
        live = [s for s in self.streams if s.state is StreamState.LIVE]
        if live:
            actions.append(Beat(live))
        return actions

    def expire(self, now: float) -> list[Action]:
        """End the streams whose subscribe token expired by `now`."""
        actions: list[Action] = []
        while self._expiries and self._expiries[0][0] <= now:
            _, _, stream = heapq.heappop(self._expiries)
            # (A stream not live yet learns it from caught_up.)
            actions += self.leave(stream, "token_expired", TOKEN_EXPIRED)
        return actions

    def next_expiry(self) -> float | None:
        """When the next subscribe token runs out, if any stream has one."""
        while self._expiries and self._expiries[0][2].state is StreamState.CLOSED:
            heapq.heappop(self._expiries)
        return self._expiries[0][0] if self._expiries else None

    def shutdown(self) -> list[Action]:
        """The worker is stopping: every stream ends; no new one opens."""
        self.stopping = True
        actions: list[Action] = []
        for stream in list(self.streams):
            actions += self.leave(stream, "shutdown")
        return actions
