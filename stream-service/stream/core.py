"""The stream service's core: every partition, channel and stream of one worker,
and every decision about them, with no I/O (no gevent, no sockets, no Redis
calls: of contract.py it takes only the key names).

Inputs are method calls: a stream opens or leaves, Redis confirms a
subscription, a message arrives, a partition's connection is lost or back,
history was read, a tick. Each returns what to do, as actions (actions.py:
`Subscribe`, `Deliver`, `Reset`, ...), which the adapters carry out: `hub.py`
and its links (link.py; Redis Pub/Sub, timers) and `writer.py` (one writer
per stream, the only code that touches its socket). The records the core
keeps are in records.py, event ids in ids.py, the frames it builds in
frames.py.

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

import heapq
from collections.abc import Iterable

from . import sse
from .actions import (
    Action,
    Beat,
    Deliver,
    End,
    Malformed,
    ReadGap,
    Ready,
    Reset,
    Subscribe,
    Unsubscribe,
)
from .contract import live_key, partition_in_key, partition_of
from .frames import PREAMBLE_COMMENT, TOKEN_EXPIRED, Payload, envelope, event_body, reset_body, with_id
from .ids import Position, resume_points
from .records import (
    Channel,
    ChannelState,
    EventItem,
    HistoryRequest,
    Item,
    Partition,
    Replay,
    ResetItem,
    Stream,
    StreamState,
)

__all__ = ["Core", "Full", "Unavailable"]


class Unavailable(Exception):
    """The worker cannot serve a new stream now (Redis unreachable, shutting down)."""


class Full(Unavailable):
    """The worker holds MAX_CONNECTIONS streams already."""

    def __init__(self) -> None:
        super().__init__("this worker is at its connection limit")


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

    # -- what the adapters read -------------------------------------------

    def position_of(self, number: int) -> Position | None:
        """The last position dispatched in partition `number` (None before its first connection)."""
        part = self.parts[number]
        return Position(part.epoch, part.position) if part.epoch else None

    def channels_in(self, numbers: Iterable[int]) -> int:
        """How many channels this worker has in partitions `numbers`."""
        wanted = set(numbers)
        return sum(1 for c in self.channels.values() if c.part.number in wanted)

    def holds(self, key: bytes) -> bool:
        """True if the core holds `key` subscribed: it has streams and no SUBSCRIBE out
        (so an unsubscribe of it was not the core's)."""
        channel = self.channels.get(key)
        return channel is not None and channel.outstanding == 0 and channel.streams != set()

    def stream_counts(self) -> dict[tuple[int, str], int]:
        """Streams per (partition, channel name) on this worker, now."""
        return {(c.part.number, c.name): len(c.streams) for c in self.channels.values() if c.streams}

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
        return with_id(stream.id() if stream.vector else item.id, item.payload.body(stream.wrap))

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
            assert stream.resume is not None
            after = resume_points(stream.resume, stream.parts)
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
            return self.parts[partition_in_key(key)]
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
