"""The stream core against a model of Redis, driven by random schedules (hypothesis).

A small Redis model holds history and a Pub/Sub connection that delivers, in
order, subscribe confirmations and the messages published after a SUBSCRIBE
took effect. Hypothesis interleaves publishes, streams opening and leaving,
replies arriving, history reads and the connection dropping. After every step
and once everything has settled, it checks what Centrifugo's stress tests
check: no stream gets an event twice or out of order, a settled live stream has
every event of its channels since its start, and Redis holds exactly the
subscriptions that local streams need.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from stream.core import (
    LIVE_PREFIX,
    Action,
    Core,
    Deliver,
    End,
    HistoryEvent,
    ReadGap,
    Replay,
    Reset,
    Stream,
    StreamState,
    Subscribe,
    Unsubscribe,
)

from tests.support.sse import SSEParser

EPOCH = "0123456789ab"
CHANNELS = ("a", "b", "c")


class RedisModel:
    """History plus one Pub/Sub connection, as the worker sees them."""

    def __init__(self) -> None:
        self.seq = 0
        self.history: list[HistoryEvent] = []
        self.subscribed: set[bytes] = set()
        self.inbound: deque[tuple[str, bytes, bytes]] = deque()  # (kind, key, payload)
        self.up = False

    def publish(self, channel: str) -> None:
        self.seq += 1
        self.history.append(HistoryEvent(self.seq, channel, b"message", str(self.seq).encode()))
        key = LIVE_PREFIX + channel.encode()
        if self.up and key in self.subscribed:
            self.inbound.append(("message", key, f"{EPOCH} {self.seq} message {self.seq}".encode()))

    def command(self, action: Action) -> None:
        if not self.up:
            return
        if isinstance(action, Subscribe):
            for key in action.keys:
                self.subscribed.add(key)
                self.inbound.append(("subscribe", key, b""))
        elif isinstance(action, Unsubscribe):
            self.subscribed.difference_update(action.keys)

    def read(self, channels: tuple[str, ...], after: int) -> list[HistoryEvent]:
        return [e for e in self.history if e.channel in channels and e.seq > after]


class Client:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.parser = SSEParser()
        self.seqs: list[int] = []
        self.start: int | None = None  # the position its stream started from

    def feed(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            if frame.event is not None and frame.event.event == "message":
                self.seqs.append(int(frame.event.id.split("-")[1]))
            elif frame.event is None and self.start is None and "id" in frame.fields:
                self.start = int(frame.fields["id"].split("-")[1])  # the id-only frame: its start


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core(max_streams=100, queue_limit_bytes=1 << 20, retry_ms=1000)
        self.redis = RedisModel()
        self.clients: list[Client] = []
        self.ended: list[Client] = []
        self.gap: ReadGap | None = None

    # -- the adapters ---------------------------------------------------------------

    def do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Subscribe | Unsubscribe):
                self.redis.command(action)
            elif isinstance(action, ReadGap):
                self.gap = action  # read later: streams may come and go meanwhile
            elif isinstance(action, Deliver | Reset):
                for stream in action.streams:
                    self.client(stream).feed(action.frame)
            elif isinstance(action, End):
                client = self.client(action.stream)
                self.clients.remove(client)
                self.ended.append(client)

    def client(self, stream: Stream) -> Client:
        return next(c for c in self.clients if c.stream is stream)

    # -- rules ----------------------------------------------------------------------

    @rule(channel=st.sampled_from(CHANNELS))
    def publish(self, channel: str) -> None:
        self.redis.publish(channel)

    @rule(channels=st.sets(st.sampled_from(CHANNELS), min_size=1, max_size=3))
    def open_stream(self, channels: set[str]) -> None:
        stream = Stream(sorted(channels))
        self.clients.append(Client(stream))
        self.do(self.core.open(stream))

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def leave(self, data: Any) -> None:
        client = data.draw(st.sampled_from(self.clients))
        self.do(self.core.leave(client.stream))

    @precondition(lambda self: self.redis.inbound)
    @rule()
    def reply_arrives(self) -> None:
        kind, key, payload = self.redis.inbound.popleft()
        if kind == "subscribe":
            self.do(self.core.confirmed(key))
        else:
            self.do(self.core.message(key, payload))

    @precondition(lambda self: any(c.stream.state is StreamState.CATCHING_UP for c in self.clients))
    @rule(data=st.data())
    def history_read(self, data: Any) -> None:
        catching_up = [c for c in self.clients if c.stream.state is StreamState.CATCHING_UP]
        client = data.draw(st.sampled_from(catching_up))
        request = client.stream.history
        replay = None
        if request is not None:
            replay = Replay(EPOCH, self.redis.seq, self.redis.read(client.stream.channels, request.after.seq))
        client.feed(self.core.caught_up(client.stream, replay))

    @precondition(lambda self: self.gap is not None)
    @rule()
    def gap_read(self) -> None:
        gap, self.gap = self.gap, None
        assert gap is not None
        events = self.redis.read(gap.channels, gap.after.seq)
        self.do(self.core.gap_read(Replay(EPOCH, self.redis.seq, events)))

    @precondition(lambda self: not self.redis.up)
    @rule()
    def connect(self) -> None:
        self.redis.up = True
        self.do(self.core.connection_up(EPOCH, self.redis.seq))

    @precondition(lambda self: self.redis.up)
    @rule()
    def connection_drops(self) -> None:
        self.redis.up = False
        self.redis.subscribed.clear()
        self.redis.inbound.clear()
        self.gap = None
        self.do(self.core.connection_lost())

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def once_each_in_order(self) -> None:
        for client in self.clients + self.ended:
            assert client.seqs == sorted(set(client.seqs)), client.seqs

    def teardown(self) -> None:
        """Settle (connected, every reply read, every history read), then check
        completeness and that Redis holds exactly the subscriptions needed."""
        if not self.redis.up:
            self.connect()
        for _ in range(1000):
            if self.redis.inbound:
                self.reply_arrives()
                continue
            if self.gap is not None:
                self.gap_read()
                continue
            catching_up = [c for c in self.clients if c.stream.state is StreamState.CATCHING_UP]
            if not catching_up:
                break
            client = catching_up[0]
            request = client.stream.history
            replay = None
            if request is not None:
                events = self.redis.read(client.stream.channels, request.after.seq)
                replay = Replay(EPOCH, self.redis.seq, events)
            client.feed(self.core.caught_up(client.stream, replay))
        self.once_each_in_order()
        for client in self.clients:
            assert client.stream.state is StreamState.LIVE, client.stream
            assert client.start is not None
            expected = [e.seq for e in self.redis.read(client.stream.channels, client.start)]
            assert client.seqs == expected, (client.stream, client.start, client.seqs, expected)
        needed = {k for c in self.clients for k in c.stream.keys}
        assert self.redis.subscribed == needed


CoreMachine.TestCase.settings = settings(max_examples=1500, stateful_step_count=30, deadline=None)
TestCoreAgainstRedisModel = CoreMachine.TestCase
