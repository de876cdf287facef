"""The stream core driven with scripted inputs: no gevent, no sockets, no Redis.

Each test feeds the core what the adapters would (a stream opens, Redis confirms
a SUBSCRIBE, a message arrives, the connection drops, history was read, a
tick) and checks what it decides. A `World` plays the adapters: it records the
commands, and plays each stream's bytes into a spec-exact SSE parser, so the
assertions are about what a client would see.
"""

from __future__ import annotations

import json
import re

import pytest
from stream.actions import (
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
from stream.contract import live_key, partition_of
from stream.core import Core, Full, Unavailable
from stream.ids import BadEventId, Position, parse_event_id
from stream.records import ChannelState, HistoryEvent, Replay, Stream, StreamState

from tests.support.sse import Event, SSEParser

EPOCH = "0123456789ab"
OTHER = "ba9876543210"


def key(channel: str) -> bytes:
    return live_key(channel, 0)


def payload(seq: int, data: str, epoch: str = EPOCH, event: str = "message") -> bytes:
    return f"{epoch} {seq} {event} {data}".encode()


def event(seq: int, channel: str, data: str) -> HistoryEvent:
    return HistoryEvent(seq, channel, b"message", data.encode())


class Client:
    """What one stream's client receives: bytes through a spec-exact parser."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parser = SSEParser()
        self.events: list[Event] = []
        self.beats = 0
        self.ended: str | None = None

    def feed(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            if frame.event is not None:
                self.events.append(frame.event)

    @property
    def data(self) -> list[str]:
        """The message events' data, unwrapped (a multi-channel stream's data names its channel)."""
        return [unwrap(self.stream, e.data)[1] for e in self.events if e.event == "message"]


ENVELOPE = re.compile(r'\{"channel":"([^"]+)","data":(.*)\}', re.S)


def unwrap(stream: Stream, data: str) -> tuple[str | None, str]:
    """(channel, data) of an event: wrapped on a multi-channel stream, as is on one channel."""
    if not stream.wrap:
        return None, data
    match = ENVELOPE.fullmatch(data)
    assert match, data
    return match[1], match[2]


def state(client: Client) -> StreamState:
    """The stream's state (a call, so that type checkers do not narrow it)."""
    return client.stream.state


class World:
    """The adapters around one core: records commands, plays bytes to clients."""

    def __init__(self, max_streams: int = 100, queue_limit: int = 10_000) -> None:
        self.core = Core(max_streams=max_streams, queue_limit_bytes=queue_limit, retry_ms=1000)
        self.commands: list[tuple[str, tuple[bytes, ...]]] = []
        self.gaps: list[ReadGap] = []
        self.ready: list[Stream] = []
        self.clients: dict[Stream, Client] = {}
        self.malformed = 0

    def do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Subscribe):
                self.commands.append(("SUBSCRIBE", action.keys))
            elif isinstance(action, Unsubscribe):
                self.commands.append(("UNSUBSCRIBE", action.keys))
            elif isinstance(action, ReadGap):
                self.gaps.append(action)
            elif isinstance(action, Ready):
                self.ready.append(action.stream)
            elif isinstance(action, Deliver | Reset):
                for stream in action.streams:
                    assert stream.state is StreamState.LIVE
                    self.clients[stream].feed(action.frame)
            elif isinstance(action, Beat):
                for stream in action.streams:
                    self.clients[stream].beats += 1
            elif isinstance(action, End):
                client = self.clients.get(action.stream)
                if client is not None:
                    client.feed(action.frame)
                    client.ended = action.reason
            elif isinstance(action, Malformed):
                self.malformed += 1

    # -- inputs -------------------------------------------------------------

    def connect(self, seq: int, epoch: str = EPOCH) -> None:
        self.do(self.core.connection_up(0, epoch, seq))

    def open(self, *channels: str, resume: Position | None = None, expires: float | None = None) -> Client:
        stream = Stream(channels, resume, expires)
        client = self.clients[stream] = Client(stream)
        self.do(self.core.open(stream))
        return client

    def confirm(self, *channels: str) -> None:
        for channel in channels:
            self.do(self.core.confirmed(key(channel)))

    def message(self, channel: str, seq: int, data: str, epoch: str = EPOCH) -> None:
        self.do(self.core.message(key(channel), payload(seq, data, epoch)))

    def catch_up(self, client: Client, replay: Replay | None = None) -> None:
        """The adapter read the stream's history (or needed none): it goes live."""
        client.feed(self.core.caught_up(client.stream, {0: replay} if replay else None))

    def leave(self, client: Client) -> None:
        self.do(self.core.leave(client.stream))

    def subscribed(self) -> set[bytes]:
        """What Redis would hold subscribed, from the commands sent in order."""
        held: set[bytes] = set()
        for command, keys in self.commands:
            (held.update if command == "SUBSCRIBE" else held.difference_update)(keys)
        return held

    def live(self, *channels: str, seq: int = 0) -> Client:
        """A connected core with a live stream on `channels`, caught up."""
        if not self.core.connected:
            self.connect(seq)
        client = self.open(*channels)
        self.confirm(*channels)
        assert state(client) is StreamState.CATCHING_UP
        self.catch_up(client, self.replay_for(client))
        assert state(client) is StreamState.LIVE
        return client

    def replay_for(self, client: Client, events: list[HistoryEvent] | None = None) -> Replay | None:
        request = client.stream.history
        if request is None:
            return None
        return Replay(EPOCH, self.core.position, events or [])


# -- opening streams ---------------------------------------------------------------


def test_a_first_stream_subscribes_and_goes_live_once_confirmed() -> None:
    world = World()
    world.connect(seq=5)
    client = world.open("a")
    assert world.commands == [("SUBSCRIBE", (key("a"),))]
    assert state(client) is StreamState.WAITING and world.ready == []
    world.confirm("a")
    assert world.ready == [client.stream]
    # Just confirmed: events published between the worker's position and the
    # SUBSCRIBE taking effect never come live, so the stream starts where Redis
    # is now (its partition's position is read), not from the older position.
    assert client.stream.history is not None
    assert client.stream.history.after == {0: Position(EPOCH, 5)} and not client.stream.history.check
    world.message("a", 6, "six")  # live while it catches up, but before its start
    world.catch_up(client, Replay(EPOCH, 6))
    assert client.parser.last_event_id == f"{EPOCH}-6"  # its start: the id-only frame
    world.message("a", 7, "seven")
    assert client.data == ["seven"]
    assert client.parser.last_event_id == f"{EPOCH}-7"


def test_two_streams_racing_on_a_new_channel_share_one_subscribe() -> None:
    world = World()
    world.connect(seq=0)
    first, second = world.open("a"), world.open("a")
    assert world.commands == [("SUBSCRIBE", (key("a"),))]
    world.confirm("a")
    assert set(world.ready) == {first.stream, second.stream}
    for client in (first, second):
        world.catch_up(client, world.replay_for(client))
    world.message("a", 1, "x")
    assert first.data == second.data == ["x"]


def test_a_stream_on_a_channel_live_for_a_while_needs_no_history() -> None:
    world = World()
    world.live("a")
    world.message("a", 1, "x")
    late = world.open("a")
    assert state(late) is StreamState.CATCHING_UP and late.stream.history is None
    world.catch_up(late)
    assert late.parser.last_event_id == f"{EPOCH}-1"  # the id-only frame: its start
    world.message("a", 2, "y")
    assert late.data == ["y"]


def test_a_stream_waits_until_every_channel_is_live() -> None:
    world = World()
    world.live("a")
    client = world.open("a", "b")
    assert state(client) is StreamState.WAITING
    world.message("a", 1, "not for it: it starts later")
    world.confirm("b")
    assert state(client) is StreamState.CATCHING_UP
    world.catch_up(client, world.replay_for(client))
    world.message("b", 2, "b2")
    world.message("a", 3, "a3")
    assert client.data == ["b2", "a3"]


def test_max_streams_is_a_hard_limit_counted_at_open() -> None:
    world = World(max_streams=2)
    world.connect(seq=0)
    world.open("a")
    world.open("b")  # neither is live yet: both hold their slot already
    with pytest.raises(Full):
        world.open("c")
    assert len(world.core.streams) == 2
    assert key("c") not in world.core.channels


def test_a_stopping_core_opens_nothing() -> None:
    world = World()
    world.connect(seq=0)
    world.do(world.core.shutdown())
    with pytest.raises(Unavailable):
        world.open("a")


# -- leaving --------------------------------------------------------------------


def test_the_last_stream_leaving_unsubscribes_and_leaving_twice_does_nothing() -> None:
    world = World()
    first = world.live("a")
    second = world.open("a")
    world.leave(first)
    assert world.subscribed() == {key("a")}
    world.leave(second)
    second.ended = None
    world.leave(second)
    assert second.ended is None  # one End per stream: its writer ends, it is counted, once
    assert first.ended == "gone"
    assert world.subscribed() == set()
    assert world.commands.count(("UNSUBSCRIBE", (key("a"),))) == 1
    assert world.core.streams == set() and world.core.channels == {}


def test_a_stream_leaving_while_its_subscribe_is_pending_is_unsubscribed_on_confirmation() -> None:
    world = World()
    world.connect(seq=0)
    client = world.open("a")
    world.leave(client)
    assert world.subscribed() == {key("a")}  # the SUBSCRIBE is on its way
    world.confirm("a")
    assert world.subscribed() == set()
    assert world.core.channels == {}


def test_a_stream_arriving_while_the_unsubscribe_on_confirmation_is_due_keeps_the_channel() -> None:
    world = World()
    world.connect(seq=0)
    world.leave(world.open("a"))
    again = world.open("a")
    world.confirm("a")
    assert world.subscribed() == {key("a")} and state(again) is StreamState.CATCHING_UP
    assert world.commands == [("SUBSCRIBE", (key("a"),))]


def test_a_stream_leaving_while_the_gap_is_replayed_is_unsubscribed() -> None:
    """The orphan: a channel confirmed during recovery, not live yet, loses its last stream."""
    world = World()
    client = world.live("a")
    world.do(world.core.connection_lost())
    world.connect(seq=0)
    world.confirm("a")
    assert len(world.gaps) == 1  # the worker now reads the gap
    world.leave(client)
    assert world.subscribed() == set()
    world.do(world.core.gap_read(0, Replay(EPOCH, 0)))
    assert world.core.channels == {} and world.subscribed() == set()


# -- reconnects, held and replayed events ----------------------------------------


def test_held_replayed_and_live_events_reach_a_stream_once_each_in_order() -> None:
    world = World()
    client = world.live("a")
    world.message("a", 1, "one")
    world.do(world.core.connection_lost())
    world.connect(seq=3)  # 2 and 3 were published while the worker was away
    assert world.commands[-1] == ("SUBSCRIBE", (key("a"),))
    world.message("a", 3, "three (held)")
    world.message("a", 4, "four (held)")
    world.confirm("a")
    (gap,) = world.gaps
    assert gap.after == Position(EPOCH, 1) and gap.channels == ("a",)
    assert client.data == ["one"]  # nothing is dispatched while the gap is open
    world.do(world.core.gap_read(0, Replay(EPOCH, 4, [event(2, "a", "two"), event(3, "a", "three")])))
    world.message("a", 5, "five")
    assert client.data == ["one", "two", "three", "four (held)", "five"]
    assert world.core.channels[key("a")].state is ChannelState.LIVE


def test_a_long_gap_is_read_in_pages_before_the_partition_goes_live() -> None:
    world = World()
    client = world.live("a", "b")
    world.do(world.core.connection_lost())
    world.connect(seq=5)
    world.message("a", 6, "six (held)")
    world.confirm("a", "b")
    (gap,) = world.gaps
    assert gap.after == Position(EPOCH, 0)
    first = Replay(EPOCH, 6, [event(1, "a", "one"), event(2, "b", "two")], complete=False)
    world.do(world.core.gap_read(0, first))
    assert client.data == ["one", "two"] and len(world.gaps) == 2  # the next page is asked for
    assert world.gaps[-1].after == Position(EPOCH, 2) and set(world.gaps[-1].channels) == {"a", "b"}
    assert world.core.channels[key("a")].state is not ChannelState.LIVE
    world.do(world.core.gap_read(0, Replay(EPOCH, 6, [event(4, "a", "four"), event(5, "b", "five")])))
    assert client.data == ["one", "two", "four", "five", "six (held)"]
    assert world.core.channels[key("a")].state is ChannelState.LIVE and len(world.gaps) == 2


def test_streams_opened_while_disconnected_wait_and_are_subscribed_on_connect() -> None:
    world = World()
    client = world.open("a")
    assert world.commands == [] and state(client) is StreamState.WAITING
    world.connect(seq=2)
    assert world.commands == [("SUBSCRIBE", (key("a"),))]
    world.confirm("a")
    assert world.gaps == []  # a first connection has no gap
    assert state(client) is StreamState.CATCHING_UP


def test_a_stream_opened_during_recovery_goes_live_after_the_gap() -> None:
    world = World()
    world.live("a")
    world.do(world.core.connection_lost())
    world.connect(seq=0)
    late = world.open("b")
    world.confirm("a")
    assert world.gaps == []  # b is not confirmed yet
    world.confirm("b")
    assert len(world.gaps) == 1 and state(late) is StreamState.WAITING
    world.do(world.core.gap_read(0, Replay(EPOCH, 0)))
    assert state(late) is StreamState.CATCHING_UP


def test_live_events_during_catch_up_are_queued_and_duplicates_of_the_replay_dropped() -> None:
    world = World()
    world.live("a")
    world.message("a", 1, "one")
    resumer = world.open("a", resume=Position(EPOCH, 0))
    assert resumer.stream.history is not None and resumer.stream.history.check
    world.message("a", 2, "two")  # arrives while its history is read...
    world.message("a", 3, "three")
    # ...and history already holds 2 (read after it was published).
    world.catch_up(resumer, Replay(EPOCH, 2, [event(1, "a", "one"), event(2, "a", "two")]))
    world.message("a", 4, "four")
    assert resumer.data == ["one", "two", "three", "four"]


def test_a_resume_ahead_of_the_worker_drops_what_it_has_seen() -> None:
    world = World()
    client = world.live("a")
    resumer = world.open("a", resume=Position(EPOCH, 3))  # from a replica further along
    world.catch_up(resumer, Replay(EPOCH, 3, []))
    for seq in (1, 2, 3, 4):
        world.message("a", seq, str(seq))
    assert resumer.data == ["4"]
    assert client.data == ["1", "2", "3", "4"]


def test_trimmed_history_resets_the_stream_which_then_goes_on_live() -> None:
    world = World()
    world.live("a", seq=10)
    resumer = world.open("a", resume=Position(EPOCH, 2))
    world.catch_up(resumer, Replay(EPOCH, 10, reset="history_trimmed"))
    (reset,) = resumer.events
    assert reset.event == "reset" and json.loads(reset.data) == {"reason": "history_trimmed"}
    assert reset.id == f"{EPOCH}-10"
    world.message("a", 11, "eleven")
    assert resumer.data == ["eleven"]


# -- epochs -----------------------------------------------------------------------


def test_an_epoch_change_on_the_live_path_resets_every_stream_first() -> None:
    world = World()
    client = world.live("a")
    world.message("a", 5, "old")
    world.message("a", 1, "new", epoch=OTHER)
    world.message("a", 2, "newer", epoch=OTHER)
    kinds = [(e.event, e.data) for e in client.events]
    assert kinds == [
        ("message", "old"),
        ("reset", '{"reason": "epoch_changed"}'),
        ("message", "new"),
        ("message", "newer"),
    ]
    assert client.events[1].id == f"{OTHER}-0"
    assert world.core.epoch == OTHER


def test_an_epoch_change_found_on_reconnect_resets_every_stream_and_reads_no_gap() -> None:
    world = World()
    client = world.live("a")
    world.message("a", 7, "seven")
    world.do(world.core.connection_lost())
    world.connect(seq=2, epoch=OTHER)
    world.confirm("a")
    assert world.gaps == []
    world.message("a", 3, "three", epoch=OTHER)
    assert [e.event for e in client.events] == ["message", "reset", "message"]
    assert client.events[1].id == f"{OTHER}-2"


def test_an_epoch_change_while_a_stream_catches_up_reaches_it_in_order() -> None:
    world = World()
    world.live("a")
    late = world.open("a", resume=Position(EPOCH, 0))
    world.message("a", 1, "new", epoch=OTHER)
    world.catch_up(late, Replay(EPOCH, 0, []))
    assert [e.event for e in late.events] == ["reset", "message"]


def test_a_stream_that_already_reset_to_the_new_epoch_skips_the_workers_reset() -> None:
    world = World()
    world.live("a")
    late = world.open("a", resume=Position(EPOCH, 0))
    world.message("a", 1, "new", epoch=OTHER)  # queued for it: a reset, then the event
    # Its history read already saw the new epoch: it resets from there itself.
    world.catch_up(late, Replay(OTHER, 1, reset="epoch_changed"))
    assert [e.event for e in late.events] == ["reset"]
    world.message("a", 2, "two", epoch=OTHER)
    assert late.data == ["two"]


# -- limits, time and the end --------------------------------------------------------


def test_a_queue_overflow_while_catching_up_reads_history_again_instead_of_cutting() -> None:
    world = World(queue_limit=500)
    world.live("a")
    late = world.open("a", resume=Position(EPOCH, 0))
    request = world.core.next_read(late.stream)  # the first read begins...
    assert request is not None and request.after == {0: Position(EPOCH, 0)}
    for seq in range(1, 20):  # ...while 19 events (over the queue's bound) arrive live
        world.message("a", seq, f"e{seq}")
    assert late.ended is None and state(late) is StreamState.CATCHING_UP
    assert late.stream.queued_bytes <= 500
    # That read saw events 1-5 only: the queue lost some of 6-19, so history is read again.
    late.feed(
        world.core.caught_up(
            late.stream, {0: Replay(EPOCH, 5, [event(s, "a", f"e{s}") for s in range(1, 6)])}
        )
    )
    assert state(late) is StreamState.CATCHING_UP
    again = world.core.next_read(late.stream)
    assert again is not None and again.after == {0: Position(EPOCH, 5)} and again.check
    late.feed(
        world.core.replayed(
            late.stream, {0: Replay(EPOCH, 19, [event(s, "a", f"e{s}") for s in range(6, 20)])}
        )
    )
    assert state(late) is StreamState.LIVE
    world.message("a", 20, "e20")
    assert late.data == [f"e{s}" for s in range(1, 21)]


def test_a_page_that_stops_short_is_read_on_from_its_last_event() -> None:
    world = World()
    world.live("a", "b")
    late = world.open("a", "b", resume=Position(EPOCH, 0))
    world.message("a", 7, "live")  # queued while it catches up
    first = Replay(EPOCH, 6, [event(1, "a", "one"), event(2, "b", "two")], complete=False)
    late.feed(world.core.caught_up(late.stream, {0: first}))
    assert state(late) is StreamState.CATCHING_UP
    request = world.core.next_read(late.stream)
    assert request is not None and request.after == {0: Position(EPOCH, 2)}
    assert set(request.channels[0]) == {"a", "b"}
    rest = Replay(EPOCH, 6, [event(4, "a", "four"), event(6, "b", "six")])
    late.feed(world.core.replayed(late.stream, {0: rest}))
    assert state(late) is StreamState.LIVE and world.core.next_read(late.stream) is None
    assert late.data == ["one", "two", "four", "six", "live"]


def test_a_stream_that_ends_while_catching_up_gets_nothing_more() -> None:
    world = World()
    world.live("a")
    late = world.open("a", resume=Position(EPOCH, 0))
    late.feed(
        world.core.caught_up(late.stream, {0: Replay(EPOCH, 9, [event(1, "a", "one")], complete=False)})
    )
    world.leave(late)
    assert world.core.replayed(late.stream, {0: Replay(EPOCH, 9, [event(2, "a", "two")])}) == b""
    assert world.core.next_read(late.stream) is None and late.data == ["one"]


def test_a_tick_beats_live_streams_and_ends_expired_ones() -> None:
    world = World()
    world.connect(seq=0)
    keeper = world.live("a")
    expiring = world.open("a", expires=100.0)
    world.catch_up(expiring)
    world.do(world.core.tick(99.0))
    assert keeper.beats == expiring.beats == 1 and expiring.ended is None
    assert world.core.next_expiry() == 100.0
    world.do(world.core.expire(100.0))
    assert expiring.ended == "token_expired"
    assert [e.event for e in expiring.events] == ["token_expired"]
    assert world.core.next_expiry() is None
    world.do(world.core.tick(101.0))
    assert keeper.beats == 2 and expiring.beats == 1


def test_shutdown_ends_every_stream_and_unsubscribes() -> None:
    world = World()
    clients = [world.live("a"), world.live("b")]
    waiting = world.open("c")
    world.do(world.core.shutdown())
    assert [c.ended for c in clients] == ["shutdown", "shutdown"]
    assert state(waiting) is StreamState.CLOSED
    assert world.core.streams == set()


def test_a_malformed_message_is_reported_and_skipped() -> None:
    world = World()
    client = world.live("a")
    world.do(world.core.message(key("a"), b"garbage"))
    world.do(world.core.message(key("a"), payload(1, "x", event="bad\nname")))
    world.message("a", 2, "fine")
    assert world.malformed == 2 and client.data == ["fine"]


# -- partitions (PARTITIONS > 1) -------------------------------------------------------

PARTS = 4


def two_partitions() -> tuple[str, str]:
    """Two channel names in different partitions (of PARTS)."""
    names = [f"ch{i}" for i in range(20)]
    first = names[0]
    second = next(n for n in names if partition_of(n, PARTS) != partition_of(first, PARTS))
    return first, second


class PartitionedWorld(World):
    """A World whose core has PARTS partitions, all on one connection."""

    def __init__(self) -> None:
        super().__init__()
        self.core = Core(max_streams=100, queue_limit_bytes=10_000, retry_ms=1000, partitions=PARTS)
        self.epochs = {p: f"{p:012x}" for p in range(PARTS)}

    def up(self, seqs: dict[int, int] | None = None) -> None:
        for p in range(PARTS):
            self.do(self.core.connection_up(p, self.epochs[p], (seqs or {}).get(p, 0)))

    def pkey(self, channel: str) -> bytes:
        return live_key(channel, partition_of(channel, PARTS))

    def send(self, channel: str, seq: int, data: str) -> None:
        epoch = self.epochs[partition_of(channel, PARTS)]
        self.do(self.core.message(self.pkey(channel), payload(seq, data, epoch)))

    def open_on(self, *channels: str, resume: str | None = None) -> Client:
        stream = Stream(channels, parse_event_id(resume) if resume else None)
        client = self.clients[stream] = Client(stream)
        self.do(self.core.open(stream))
        for c in channels:
            self.do(self.core.confirmed(self.pkey(c)))
        return client

    def read(self, client: Client, history: dict[int, list[HistoryEvent]], seqs: dict[int, int]) -> None:
        """Answer the stream's history request from `history`, Redis being at `seqs`."""
        request = client.stream.history
        replays = None
        if request is not None:
            replays = {
                p: Replay(
                    self.epochs[p],
                    seqs.get(p, 0),
                    [e for e in history.get(p, []) if e.seq > after.seq and e.channel in request.channels[p]],
                )
                for p, after in request.after.items()
            }
        client.feed(self.core.caught_up(client.stream, replays))


def test_a_stream_over_two_partitions_carries_a_vector_id_and_a_single_one_a_plain_id() -> None:
    a, b = two_partitions()
    pa, pb = sorted((partition_of(a, PARTS), partition_of(b, PARTS)))
    world = PartitionedWorld()
    world.up({partition_of(a, PARTS): 3, partition_of(b, PARTS): 7})
    both = world.open_on(a, b)
    only_a = world.open_on(a)
    # One SSUBSCRIBE per partition: a call may only name channels of one slot.
    assert sorted(len(keys) for _, keys in world.commands) == [1, 1]
    world.read(both, {}, {})
    world.read(only_a, {}, {})
    world.send(a, 4, "a4")
    world.send(b, 8, "b8")
    world.send(a, 5, "a5")
    # A multi-channel stream's events name their channel; a single channel's stay as published.
    assert [unwrap(both.stream, e.data) for e in both.events] == [(a, "a4"), (b, "b8"), (a, "a5")]
    assert [e.data for e in only_a.events] == ["a4", "a5"]
    assert only_a.parser.last_event_id == f"{world.epochs[partition_of(a, PARTS)]}-5"
    positions = {partition_of(a, PARTS): 5, partition_of(b, PARTS): 8}
    expected = "_".join(f"{p}.{world.epochs[p]}-{positions[p]}" for p in (pa, pb))
    assert both.parser.last_event_id == expected


def test_a_vector_id_resumes_each_partition_exactly() -> None:
    a, b = two_partitions()
    qa, qb = partition_of(a, PARTS), partition_of(b, PARTS)
    world = PartitionedWorld()
    world.up({qa: 10, qb: 20})
    resume = "_".join(f"{p}.{world.epochs[p]}-{s}" for p, s in sorted({qa: 8, qb: 19}.items()))
    client = world.open_on(a, b, resume=resume)
    request = client.stream.history
    assert request is not None and request.check
    assert request.after == {qa: Position(world.epochs[qa], 8), qb: Position(world.epochs[qb], 19)}
    history = {
        qa: [event(8, a, "a8"), event(9, a, "a9"), event(10, a, "a10")],
        qb: [event(19, b, "b19"), event(20, b, "b20")],
    }
    world.send(a, 11, "a11")  # live while it catches up: queued, after the replay
    world.read(client, history, {qa: 10, qb: 20})
    assert sorted(client.data) == ["a10", "a11", "a9", "b20"]
    assert {unwrap(client.stream, e.data)[0] for e in client.events} == {a, b}
    order_a = [d for d in client.data if d.startswith("a")]
    assert order_a == ["a9", "a10", "a11"]


@pytest.mark.parametrize("kind", ["plain", "missing_partition"])
def test_an_id_that_does_not_name_every_partition_of_the_stream_resets_it(kind: str) -> None:
    a, b = two_partitions()
    qa, qb = partition_of(a, PARTS), partition_of(b, PARTS)
    world = PartitionedWorld()
    world.up({qa: 10, qb: 20})
    resume = f"{world.epochs[qa]}-3" if kind == "plain" else f"{qa}.{world.epochs[qa]}-3"
    client = world.open_on(a, b, resume=resume)
    assert client.stream.history is None
    world.read(client, {}, {})
    assert [e.event for e in client.events] == ["reset"]
    assert json.loads(client.events[0].data) == {"reason": "unknown_id"}
    lo, hi = sorted((qa, qb))
    seqs = {qa: 10, qb: 20}
    assert client.events[0].id == f"{lo}.{world.epochs[lo]}-{seqs[lo]}_{hi}.{world.epochs[hi]}-{seqs[hi]}"
    world.send(b, 21, "b21")
    assert client.data == ["b21"]


def test_one_partition_lost_and_back_replays_its_gap_while_the_other_stays_live() -> None:
    a, b = two_partitions()
    qa = partition_of(a, PARTS)
    world = PartitionedWorld()
    world.up()
    client = world.open_on(a, b)
    world.read(client, {}, {})
    world.send(a, 1, "a1")
    world.do(world.core.connection_lost([qa]))
    world.send(b, 1, "b1")  # the other partition goes on
    world.do(world.core.connection_up(qa, world.epochs[qa], 3))
    assert world.commands[-1] == ("SUBSCRIBE", (world.pkey(a),))
    world.do(world.core.confirmed(world.pkey(a)))
    gap = world.gaps[-1]
    assert gap.partition == qa and gap.after == Position(world.epochs[qa], 1)
    world.do(world.core.gap_read(qa, Replay(world.epochs[qa], 3, [event(2, a, "a2"), event(3, a, "a3")])))
    world.send(a, 3, "a3")  # a duplicate of the replay: dropped
    world.send(a, 4, "a4")
    assert client.data == ["a1", "b1", "a2", "a3", "a4"]


def test_an_epoch_change_in_one_partition_resets_its_streams_to_a_new_vector() -> None:
    a, b = two_partitions()
    qa, qb = partition_of(a, PARTS), partition_of(b, PARTS)
    world = PartitionedWorld()
    world.up({qa: 5, qb: 5})
    both, only_b = world.open_on(a, b), world.open_on(b)
    world.read(both, {}, {})
    world.read(only_b, {}, {})
    world.epochs[qa] = "fedcba987654"
    world.send(a, 1, "new-a1")
    assert [e.event for e in both.events] == ["reset", "message"]
    assert f"{qa}.fedcba987654-1" in both.parser.last_event_id
    assert only_b.events == []
    world.send(b, 6, "b6")
    assert both.data == ["new-a1", "b6"] and only_b.data == ["b6"]


@pytest.mark.parametrize(
    "text",
    ["", "0.0123456789ab", "0.0123456789ab-1_0.0123456789ab-2", "x.0123456789ab-1", "0.0123456789AB-1"],
)
def test_malformed_vector_ids_are_refused(text: str) -> None:
    with pytest.raises(BadEventId):
        parse_event_id(text)


def test_a_vector_id_is_parsed_and_its_length_is_bounded() -> None:
    assert parse_event_id("3.0123456789ab-7_10.ba9876543210-1") == {
        3: Position("0123456789ab", 7),
        10: Position("ba9876543210", 1),
    }
    entries = "_".join(f"{p}.0123456789ab-1" for p in range(65))
    with pytest.raises(BadEventId):
        parse_event_id(entries)
