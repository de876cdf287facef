"""The stream core against a model of Redis, driven by random schedules (hypothesis).

A small Redis model holds history and, per partition, a sequence and a Pub/Sub
connection that delivers, in order, subscribe confirmations and the messages
published after a SUBSCRIBE took effect. Hypothesis interleaves publishes,
streams opening and leaving (over one partition or several), replies arriving,
history reads (a page at a time, begun and answered at different moments,
with a queue bound small enough to overflow while a stream catches up),
fresh streams and resumed ones, and each partition's connection dropping and
coming back. After
every step and once everything has settled, it checks what Centrifugo's stress
tests check: no stream gets an event twice or out of order (per partition), a
settled live stream has every event of its channels since its start, and Redis
holds exactly the subscriptions that local streams need.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from stream.actions import Action, Deliver, End, ReadGap, Reset, Subscribe, Unsubscribe
from stream.contract import live_key, partition_of
from stream.core import Core
from stream.ids import Position, ResumeId, parse_event_id
from stream.records import HistoryEvent, Replay, Stream, StreamState

from tests.support.sse import SSEParser

PARTS = 2
EPOCHS = {p: f"{p:012x}" for p in range(PARTS)}
# Four channels, two in each partition.
CHANNELS = tuple(
    [n for n in (f"c{i}" for i in range(50)) if partition_of(n, PARTS) == 0][:2]
    + [n for n in (f"c{i}" for i in range(50)) if partition_of(n, PARTS) == 1][:2]
)
PART = {c: partition_of(c, PARTS) for c in CHANNELS}


class RedisModel:
    """History plus, per partition, a sequence and a Pub/Sub connection."""

    def __init__(self) -> None:
        self.seq = dict.fromkeys(range(PARTS), 0)
        self.history: list[HistoryEvent] = []
        self.subscribed: set[bytes] = set()
        self.inbound: dict[int, deque[tuple[str, bytes, bytes]]] = {p: deque() for p in range(PARTS)}
        self.up = dict.fromkeys(range(PARTS), False)

    def publish(self, channel: str) -> None:
        p = PART[channel]
        self.seq[p] += 1
        seq = self.seq[p]
        data = f"{channel}:{seq}"
        self.history.append(HistoryEvent(seq, channel, b"message", data.encode()))
        key = live_key(channel, p)
        if self.up[p] and key in self.subscribed:
            self.inbound[p].append(("message", key, f"{EPOCHS[p]} {seq} message {data}".encode()))

    def command(self, action: Action) -> None:
        p = action.partition if isinstance(action, Subscribe | Unsubscribe) else 0
        if not self.up[p]:
            return
        if isinstance(action, Subscribe):
            for key in action.keys:
                self.subscribed.add(key)
                self.inbound[p].append(("subscribe", key, b""))
        elif isinstance(action, Unsubscribe):
            self.subscribed.difference_update(action.keys)

    def read(self, p: int, channels: tuple[str, ...], after: int) -> list[HistoryEvent]:
        return [e for e in self.history if e.channel in channels and PART[e.channel] == p and e.seq > after]


class Client:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parser = SSEParser()
        self.seqs: dict[int, list[int]] = {p: [] for p in range(PARTS)}
        self.start: dict[int, int] | None = None  # the position its stream started from
        self.read_once = False  # its first history read arrived

    def feed(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            if frame.event is not None and frame.event.event == "message":
                text = frame.event.data
                if self.stream.wrap:  # {"channel":"<c>","data":<c>:<seq>}
                    wrapped = json.loads(text.replace('"data":', '"data":"')[:-1] + '"}')
                    assert wrapped["data"].startswith(wrapped["channel"] + ":"), text
                    text = wrapped["data"]
                channel, seq = text.split(":")
                self.seqs[PART[channel]].append(int(seq))
            elif frame.event is None and self.start is None and "id" in frame.fields:
                # The id-only frame: where it starts, in each of its partitions.
                parsed = parse_event_id(frame.fields["id"])
                if None in parsed:
                    parsed = {self.stream.parts[0]: parsed[None]}
                self.start = {p: pos.seq for p, pos in parsed.items() if p is not None}


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A queue bound of about two events: it overflows while streams catch up.
        self.core = Core(max_streams=100, queue_limit_bytes=100, retry_ms=1000, partitions=PARTS)
        self.redis = RedisModel()
        self.clients: list[Client] = []
        self.ended: list[Client] = []
        self.gaps: dict[int, ReadGap] = {}
        self.reads: dict[Stream, dict[int, Replay] | None] = {}  # begun, not answered yet

    # -- the adapters ---------------------------------------------------------------

    def do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Subscribe | Unsubscribe):
                self.redis.command(action)
            elif isinstance(action, ReadGap):
                self.gaps[action.partition] = action  # read later: streams may come and go meanwhile
            elif isinstance(action, Deliver | Reset):
                for stream in action.streams:
                    self.client(stream).feed(action.frame)
            elif isinstance(action, End):
                client = self.client(action.stream)
                self.clients.remove(client)
                self.ended.append(client)
                self.reads.pop(action.stream, None)

    def client(self, stream: Stream) -> Client:
        return next(c for c in self.clients if c.stream is stream)

    def begin_read(self, client: Client, page: int) -> None:
        """The adapter starts a history read for `client`: one atomic page per partition."""
        request = self.core.next_read(client.stream)
        replays = None
        if request is not None:
            replays = {}
            for p, after in request.after.items():
                if not request.check:  # only the partition's position, as the hub reads it
                    replays[p] = Replay(EPOCHS[p], self.redis.seq[p])
                    continue
                events = self.redis.read(p, request.channels[p], after.seq)
                replays[p] = Replay(EPOCHS[p], self.redis.seq[p], events[:page], complete=len(events) <= page)
        self.reads[client.stream] = replays

    def answer_read(self, client: Client) -> None:
        """The read begun for `client` returns."""
        replays = self.reads.pop(client.stream)
        if client.read_once:
            client.feed(self.core.replayed(client.stream, replays or {}))
        else:
            client.read_once = True
            client.feed(self.core.caught_up(client.stream, replays))

    # -- rules ----------------------------------------------------------------------

    @rule(channel=st.sampled_from(CHANNELS))
    def publish(self, channel: str) -> None:
        self.redis.publish(channel)

    @rule(channels=st.sets(st.sampled_from(CHANNELS), min_size=1, max_size=4), data=st.data())
    def open_stream(self, channels: set[str], data: Any) -> None:
        resume: ResumeId | None = None
        if data.draw(st.booleans()):  # a resume from a position it could have seen
            parts = sorted({PART[c] for c in channels})
            at = {p: data.draw(st.integers(0, self.redis.seq[p])) for p in parts}
            resume = {(None if len(parts) == 1 else p): Position(EPOCHS[p], s) for p, s in at.items()}
        stream = Stream(sorted(channels), resume)
        client = Client(stream)
        if resume is not None:
            client.start = {
                (p if p is not None else PART[stream.channels[0]]): pos.seq for p, pos in resume.items()
            }
        self.clients.append(client)
        self.do(self.core.open(stream))

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def leave(self, data: Any) -> None:
        client = data.draw(st.sampled_from(self.clients))
        self.do(self.core.leave(client.stream))

    @precondition(lambda self: any(self.redis.inbound.values()))
    @rule(data=st.data())
    def reply_arrives(self, data: Any) -> None:
        p = data.draw(st.sampled_from([p for p, q in self.redis.inbound.items() if q]))
        self.reply_from(p)

    def reply_from(self, p: int) -> None:
        kind, key, payload = self.redis.inbound[p].popleft()
        if kind == "subscribe":
            self.do(self.core.confirmed(key))
        else:
            self.do(self.core.message(key, payload))

    def waiting_for_a_read(self) -> list[Client]:
        return [
            c
            for c in self.clients
            if c.stream.state is StreamState.CATCHING_UP and c.stream not in self.reads
        ]

    @precondition(lambda self: self.waiting_for_a_read())
    @rule(data=st.data(), page=st.integers(1, 3))
    def history_read_begins(self, data: Any, page: int) -> None:
        self.begin_read(data.draw(st.sampled_from(self.waiting_for_a_read())), page)

    @precondition(lambda self: self.reads)
    @rule(data=st.data())
    def history_read_answers(self, data: Any) -> None:
        stream = data.draw(st.sampled_from(list(self.reads)))
        self.answer_read(self.client(stream))

    @precondition(lambda self: self.gaps)
    @rule(data=st.data())
    def gap_read(self, data: Any) -> None:
        self.read_gap(data.draw(st.sampled_from(sorted(self.gaps))))

    def read_gap(self, p: int) -> None:
        gap = self.gaps.pop(p)
        events = self.redis.read(p, gap.channels, gap.after.seq)
        self.do(self.core.gap_read(p, Replay(EPOCHS[p], self.redis.seq[p], events)))

    @rule(p=st.sampled_from(range(PARTS)))
    def connect(self, p: int) -> None:
        if self.redis.up[p]:
            return
        self.redis.up[p] = True
        self.do(self.core.connection_up(p, EPOCHS[p], self.redis.seq[p]))

    @rule(p=st.sampled_from(range(PARTS)))
    def connection_drops(self, p: int) -> None:
        if not self.redis.up[p]:
            return
        self.redis.up[p] = False
        self.redis.subscribed -= {k for k in self.redis.subscribed if f"{{p{p}}}".encode() in k}
        self.redis.inbound[p].clear()
        self.gaps.pop(p, None)
        self.do(self.core.connection_lost([p]))

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def once_each_in_order(self) -> None:
        for client in self.clients + self.ended:
            for seqs in client.seqs.values():
                assert seqs == sorted(set(seqs)), client.seqs

    def teardown(self) -> None:
        """Settle (connected, every reply read, every history read), then check
        completeness and that Redis holds exactly the subscriptions needed."""
        for p in range(PARTS):
            self.connect(p)
        for _ in range(1000):
            pending = [p for p, q in self.redis.inbound.items() if q]
            if pending:
                self.reply_from(pending[0])
                continue
            if self.gaps:
                self.read_gap(min(self.gaps))
                continue
            if self.reads:
                self.answer_read(self.client(next(iter(self.reads))))
                continue
            catching_up = self.waiting_for_a_read()
            if not catching_up:
                break
            self.begin_read(catching_up[0], page=2)
        self.once_each_in_order()
        for client in self.clients:
            assert client.stream.state is StreamState.LIVE, client.stream
            assert client.start is not None and set(client.start) == set(client.stream.parts)
            for p, start in client.start.items():
                expected = [e.seq for e in self.redis.read(p, client.stream.channels, start)]
                assert client.seqs[p] == expected, (client.stream, p, start, client.seqs, expected)
        needed = {k for c in self.clients for k in c.stream.keys}
        assert self.redis.subscribed == needed


CoreMachine.TestCase.settings = settings(max_examples=1500, stateful_step_count=30, deadline=None)
TestCoreAgainstRedisModel = CoreMachine.TestCase
