"""The stream service's core: every channel and stream of one worker, and every
decision about them, with no I/O (no gevent, no sockets, no redis-py).

Inputs are method calls: a stream opens or leaves, Redis confirms a
subscription, a message arrives, the connection is lost or back, history was
read, a tick. Each returns what to do, as actions (`Subscribe`, `Deliver`,
`Reset`, ...), which the adapters carry out: `hub.py` (Redis Pub/Sub, timers)
and `writer.py` (one writer per stream, the only code that touches its socket).

The rules, in one place:
- A channel is subscribed in Redis while it has local streams, or while a
  SUBSCRIBE for it is unconfirmed (its confirmation then unsubscribes it).
- Sequence numbers are global and increasing within an epoch. The core drops a
  message at or below its position (already dispatched from history after a
  reconnect); a stream drops one at or below its own position (already sent to
  it from history while it caught up). Nowhere else is anything dropped.
- A stream is WAITING until its channels are live, CATCHING_UP while the
  adapter reads its history (live events are queued for it meanwhile, bounded),
  then LIVE: each event goes to its writer as it arrives.
"""

from __future__ import annotations

import enum
import heapq
import json
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import sse

LIVE_PREFIX = b"herald:live:"
EVENT_ID_RE = re.compile(r"([0-9a-f]{12})-([0-9]{1,18})")
PREAMBLE_COMMENT = sse.comment(b"ok")
HEARTBEAT = sse.comment(b"hb")
TOKEN_EXPIRED = sse.frame(json.dumps({"reason": "token_expired"}).encode(), event=b"token_expired")


# -- positions and frames -------------------------------------------------------


class BadEventId(ValueError):
    """A Last-Event-ID / lastEventId that is not `<12 hex epoch>-<seq>`."""


@dataclass(frozen=True, slots=True)
class Position:
    """A point in the event sequence: an epoch and the last sequence number seen."""

    epoch: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse an event id as sent in `id:` fields; raise BadEventId otherwise."""
        match = EVENT_ID_RE.fullmatch(text.strip())
        if not match:
            raise BadEventId("the last event id must look like <12 hex digits>-<number>")
        return cls(match[1], int(match[2]))

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One event read back from a channel's history stream."""

    seq: int
    channel: str
    event: bytes
    data: bytes


@dataclass(slots=True)
class Replay:
    """History as read for a stream (or for the worker after a reconnect):
    the missed events, or a reset and why."""

    epoch: str
    seq: int  # the newest sequence number in Redis when history was read
    events: list[HistoryEvent] = field(default_factory=list)
    reset: str | None = None


def event_frame(epoch: bytes, seq: bytes, event: bytes, data: bytes) -> bytes:
    """The SSE frame of one event; its id is `<epoch>-<seq>`."""
    return sse.frame(data, event=event, id=epoch + b"-" + seq)


def reset_frame(reason: str, position: Position) -> bytes:
    """A `reset` event: history cannot cover the gap; the client continues from `position`."""
    data = json.dumps({"reason": reason}).encode()
    return sse.frame(data, event=b"reset", id=str(position).encode())


# -- errors -------------------------------------------------------------------


class Unavailable(Exception):
    """The worker cannot serve a new stream now (Redis unreachable, shutting down)."""


class Full(Unavailable):
    """The worker holds MAX_CONNECTIONS streams already."""

    def __init__(self) -> None:
        super().__init__("this worker is at its connection limit")


# -- records ------------------------------------------------------------------


class ChannelState(enum.Enum):
    SUBSCRIBING = "subscribing"  # a SUBSCRIBE is due or unconfirmed
    CONFIRMED = "confirmed"  # subscribed, but the worker is replaying its gap: not live yet
    LIVE = "live"  # subscribed, and every event after `live_at` comes live


class Channel:
    """One channel of this worker: its local streams and its subscription."""

    __slots__ = ("key", "live_at", "outstanding", "state", "streams")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.streams: set[Stream] = set()
        self.state = ChannelState.SUBSCRIBING
        self.outstanding = 0  # SUBSCRIBE commands sent and not confirmed
        self.live_at: int | None = None  # the worker's position when it went live


class StreamState(enum.Enum):
    WAITING = "waiting"  # for its channels to go live
    CATCHING_UP = "catching_up"  # history is being read; live events are queued
    LIVE = "live"  # every event goes to its writer at once
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EventItem:
    """A live event queued for a stream that is catching up."""

    seq: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class ResetItem:
    """A reset queued for a stream that is catching up: it moves the stream to `to`."""

    to: Position
    frame: bytes


Item = EventItem | ResetItem


class Stream:
    """One client's stream: its channels, its position, its queue while catching up.

    `writer` belongs to the adapters; the core only carries it along.
    """

    __slots__ = (
        "channels",
        "closed",
        "epoch",
        "expires",
        "history",
        "keys",
        "queue",
        "queued_bytes",
        "resume",
        "seq",
        "state",
        "writer",
    )

    def __init__(
        self, channels: Sequence[str], resume: Position | None = None, expires: float | None = None
    ) -> None:
        self.channels = tuple(channels)
        self.keys = tuple(LIVE_PREFIX + c.encode() for c in self.channels)
        self.resume = resume  # the client's last event id, if it sent one
        self.expires = expires  # when its subscribe token runs out (epoch seconds)
        self.state = StreamState.WAITING
        self.epoch = ""  # with `seq`: the last position sent (or, while catching up, to send from)
        self.seq = 0
        self.history: HistoryRequest | None = None  # what to read before it goes live
        self.queue: deque[Item] = deque()
        self.queued_bytes = 0
        self.closed: str | None = None  # why it ended
        self.writer: Any = None

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq)

    def __repr__(self) -> str:
        return f"<Stream {','.join(self.channels)} {self.state.value} at {self.epoch}-{self.seq}>"


# -- actions ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Read history for a stream: events on its channels after `after`.

    With `check`, a replay that cannot be complete must come back as a reset.
    """

    after: Position
    check: bool


@dataclass(frozen=True, slots=True)
class Subscribe:
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ReadGap:
    """Read what was published on `channels` after `after` while the worker was away."""

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
    """The state of one worker's channels and streams, and its transitions."""

    def __init__(self, *, max_streams: int, queue_limit_bytes: int, retry_ms: int) -> None:
        self.max_streams = max_streams
        self.queue_limit_bytes = queue_limit_bytes
        self.preamble = PREAMBLE_COMMENT + sse.retry(retry_ms)
        self.channels: dict[bytes, Channel] = {}
        self.streams: set[Stream] = set()
        self.connected = False
        self.recovering = False  # connected, resubscribing and replaying the gap
        self.stopping = False
        self.epoch: str | None = None
        self._epoch_b = b""
        self.position = 0  # the last sequence number dispatched
        self._gap_from: Position | None = None  # where the gap replay starts, if one is due
        self._reading_gap = False  # a ReadGap is out; recovery ends with its gap_read
        self._unconfirmed = 0  # channels with an outstanding SUBSCRIBE during recovery
        self._held: list[tuple[bytes, bytes]] = []  # messages that arrived during recovery
        self._expiries: list[tuple[float, int, Stream]] = []  # heap of token expiries

    # -- gauges -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected, and not replaying a gap: new streams can go live."""
        return self.connected and not self.recovering

    def live_channels(self) -> int:
        return sum(1 for c in self.channels.values() if c.state is ChannelState.LIVE)

    # -- streams ------------------------------------------------------------

    def open(self, stream: Stream) -> list[Action]:
        """A client opens `stream`. Raises Full or Unavailable (then nothing changed)."""
        if self.stopping:
            raise Unavailable("the worker is shutting down")
        if len(self.streams) >= self.max_streams:
            raise Full()
        self.streams.add(stream)
        if stream.expires is not None:
            heapq.heappush(self._expiries, (stream.expires, id(stream), stream))
        to_send = []
        for key in stream.keys:
            channel = self.channels.get(key)
            if channel is None:
                channel = self.channels[key] = Channel(key)
                if self.connected:
                    channel.outstanding = 1
                    to_send.append(key)
                    if self.recovering:
                        self._unconfirmed += 1
            channel.streams.add(stream)
        actions: list[Action] = [Subscribe(tuple(to_send))] if to_send else []
        if self.ready and self._all_live(stream):
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
        gone = []
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
            if self.connected and channel.state is not ChannelState.SUBSCRIBING:
                gone.append(key)
        actions: list[Action] = [End(stream, reason, frame)]
        return [*actions, Unsubscribe(tuple(gone))] if gone else actions

    def caught_up(self, stream: Stream, replay: Replay | None) -> bytes:
        """History was read for `stream` (None: none was needed); it goes live.

        Returns what to write first: the preamble, the replayed events (or a
        reset), and the live events queued meanwhile that the replay did not cover.
        """
        if stream.state is StreamState.CLOSED:
            # It ended while catching up (its token expired, it fell too far behind).
            return self.preamble + (TOKEN_EXPIRED if stream.closed == "token_expired" else b"")
        assert stream.state is StreamState.CATCHING_UP
        out = [self.preamble]
        if replay is None:
            if stream.resume is None:
                # The id-only frame lets the browser resume from here even if
                # the stream drops before any event.
                out.append(sse.position(str(stream.position).encode()))
        elif replay.reset or replay.epoch != stream.epoch:
            stream.epoch, stream.seq = replay.epoch, replay.seq
            out.append(reset_frame(replay.reset or "epoch_changed", stream.position))
        else:
            if stream.resume is None:
                out.append(sse.position(str(stream.position).encode()))
            epoch = replay.epoch.encode()
            for e in replay.events:
                if e.seq > stream.seq:
                    out.append(event_frame(epoch, str(e.seq).encode(), e.event, e.data))
                    stream.seq = e.seq
        for item in stream.queue:
            frame = self._admit(stream, item)
            if frame is not None:
                out.append(frame)
        stream.queue.clear()
        stream.queued_bytes = 0
        stream.history = None
        stream.state = StreamState.LIVE
        return b"".join(out)

    def _admit(self, stream: Stream, item: Item) -> bytes | None:
        """The frame `stream` gets for a queued item, or None if it has it already."""
        if isinstance(item, ResetItem):
            if item.to.epoch == stream.epoch:
                return None  # it reset to this epoch while catching up
            stream.epoch, stream.seq = item.to.epoch, item.to.seq
            return item.frame
        if item.seq <= stream.seq:
            return None
        stream.seq = item.seq
        return item.frame

    def _all_live(self, stream: Stream) -> bool:
        channels = self.channels
        return all(channels[k].state is ChannelState.LIVE for k in stream.keys)

    def _make_ready(self, stream: Stream) -> Ready:
        """`stream`'s channels are all live: it starts catching up from here."""
        assert self.epoch is not None
        stream.state = StreamState.CATCHING_UP
        stream.epoch, stream.seq = self.epoch, self.position
        if stream.resume is not None:
            stream.history = HistoryRequest(stream.resume, check=True)
            stream.epoch, stream.seq = stream.resume.epoch, stream.resume.seq
        elif any(self.channels[k].live_at == self.position for k in stream.keys):
            # A channel live so recently that no event has been dispatched
            # since: events published between the position and the moment
            # Redis ran its SUBSCRIBE never came live; they come from history.
            stream.history = HistoryRequest(stream.position, check=False)
        return Ready(stream)

    # -- the Pub/Sub connection -------------------------------------------

    def connection_up(self, epoch: str, seq: int) -> list[Action]:
        """Connected to Redis, whose current epoch and sequence are `epoch`, `seq`.

        Resubscribes every channel; messages are held until the gap since the
        last position is replayed from history.
        """
        actions: list[Action] = []
        self.connected = True
        self.recovering = True
        self._held = []
        resumed = self.epoch is not None
        if self.epoch is not None and (epoch != self.epoch or seq < self.position):
            actions += self._change_epoch("epoch_changed", Position(epoch, seq))
            resumed = False
        if not resumed:
            self._set_epoch(epoch, seq)
        self._gap_from = Position(epoch, self.position) if resumed else None
        for channel in self.channels.values():
            channel.state = ChannelState.SUBSCRIBING
            channel.outstanding = 1
        self._unconfirmed = len(self.channels)
        if self.channels:
            actions.append(Subscribe(tuple(self.channels)))
        return actions + self._recovery_step()

    def connection_lost(self) -> list[Action]:
        """The Pub/Sub connection broke: every subscription is gone with it."""
        self.connected = False
        self.recovering = False
        self._reading_gap = False
        self._held = []
        self._gap_from = None
        for key, channel in list(self.channels.items()):
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
        if not channel.streams:
            del self.channels[key]  # its last stream left while it was pending
            if self.recovering:
                self._unconfirmed -= 1
                return [Unsubscribe((key,)), *self._recovery_step()]
            return [Unsubscribe((key,))]
        if self.recovering:
            channel.state = ChannelState.CONFIRMED
            self._unconfirmed -= 1
            return self._recovery_step()
        return self._go_live([channel])

    def _recovery_step(self) -> list[Action]:
        """After (re)connecting: replay the gap once every channel is confirmed."""
        if not self.recovering or self._unconfirmed > 0 or self._reading_gap:
            return []
        if self._gap_from is not None and self.channels:
            gap, self._gap_from = self._gap_from, None
            self._reading_gap = True
            names = tuple(k[len(LIVE_PREFIX) :].decode() for k in self.channels)
            return [ReadGap(names, gap)]
        return self.gap_read(None)

    def gap_read(self, replay: Replay | None) -> list[Action]:
        """The gap after a reconnect was read (None: no gap): dispatch it, then
        the messages held meanwhile, and go live."""
        actions: list[Action] = []
        self._reading_gap = False
        if replay is not None:
            epoch = replay.epoch.encode()
            for e in replay.events:
                if e.seq <= self.position or epoch != self._epoch_b:
                    continue
                frame = event_frame(epoch, str(e.seq).encode(), e.event, e.data)
                key = LIVE_PREFIX + e.channel.encode()
                actions += self._dispatch(key, e.seq, frame)
        self.recovering = False
        held, self._held = self._held, []
        for key, payload in held:
            actions += self.message(key, payload)
        confirmed = [c for c in self.channels.values() if c.state is ChannelState.CONFIRMED]
        return actions + self._go_live(confirmed)

    def _go_live(self, channels: Iterable[Channel]) -> list[Action]:
        actions: list[Action] = []
        for channel in channels:
            channel.state = ChannelState.LIVE
            channel.live_at = self.position
            for stream in channel.streams:
                if stream.state is StreamState.WAITING and self._all_live(stream):
                    actions.append(self._make_ready(stream))
        return actions

    # -- messages -------------------------------------------------------------

    def message(self, key: bytes, payload: bytes) -> list[Action]:
        """A Pub/Sub message `payload` (`<epoch> <seq> <event> <data>`) on `key`."""
        if self.recovering:
            self._held.append((key, payload))
            return []
        try:
            epoch, seqb, event, data = payload.split(b" ", 3)
            seq = int(seqb)
            frame = event_frame(epoch, seqb, event, data)
        except ValueError:
            return [Malformed(key)]
        actions: list[Action] = []
        if epoch != self._epoch_b:
            # Redis lost its data while we stayed connected: a new epoch began.
            actions += self._change_epoch("epoch_changed", Position(epoch.decode(), seq - 1))
            self._set_epoch(epoch.decode(), 0)
        if seq <= self.position:
            return actions  # already dispatched from history during recovery
        return actions + self._dispatch(key, seq, frame)

    def _dispatch(self, key: bytes, seq: int, frame: bytes) -> list[Action]:
        self.position = seq
        channel = self.channels.get(key)
        if channel is None:
            return []
        live = []
        behind = []
        for stream in channel.streams:
            state = stream.state
            if state is StreamState.LIVE:
                if seq > stream.seq:
                    stream.seq = seq
                    live.append(stream)
            elif state is StreamState.CATCHING_UP and not self._enqueue(stream, EventItem(seq, frame)):
                behind.append(stream)
        actions: list[Action] = [Deliver(frame, live)] if live else []
        return actions + self._cut(behind) if behind else actions

    def _enqueue(self, stream: Stream, item: Item) -> bool:
        """Queue `item` for a stream catching up; False if that puts it too far behind."""
        stream.queue.append(item)
        stream.queued_bytes += len(item.frame)
        return stream.queued_bytes <= self.queue_limit_bytes

    def _cut(self, streams: list[Stream]) -> list[Action]:
        actions: list[Action] = []
        for stream in streams:
            actions += self.leave(stream, "slow")
        return actions

    def _set_epoch(self, epoch: str, seq: int) -> None:
        self.epoch, self._epoch_b, self.position = epoch, epoch.encode(), seq

    def _change_epoch(self, reason: str, to: Position) -> list[Action]:
        """Every stream not on epoch `to.epoch` yet is told to reset to `to`."""
        frame = reset_frame(reason, to)
        live = []
        behind = []
        for stream in self.streams:
            if stream.epoch == to.epoch:
                continue
            if stream.state is StreamState.LIVE:
                stream.epoch, stream.seq = to.epoch, to.seq
                live.append(stream)
            elif stream.state is StreamState.CATCHING_UP and not self._enqueue(stream, ResetItem(to, frame)):
                behind.append(stream)
        actions: list[Action] = [Reset(reason, frame, live)] if live else []
        return actions + self._cut(behind)

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
