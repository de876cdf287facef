"""The hub's reconnect, driven with scripted Redis replies (no Redis, no sockets).

The Pub/Sub connection is a script of replies, in the way redis-py's own tests
script `read_response`; the commands the hub sends are recorded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from gevent.lock import Semaphore
from stream.config import Config
from stream.history import Position, Replay
from stream.hub import LIVE_PREFIX, Hub
from stream.subscriber import Subscriber

EPOCH = "0123456789ab"


class ScriptedConnection:
    """A Pub/Sub connection whose replies are scripted; it records what is sent."""

    def __init__(self, replies: Sequence[list[Any]]) -> None:
        self.replies = deque(replies)
        self.sent: list[tuple[Any, ...]] = []

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def send_command(self, *args: Any) -> None:
        self.sent.append(args)

    def can_read(self, timeout: float = 0) -> bool:
        return bool(self.replies)

    def read_response(self) -> list[Any]:
        return self.replies.popleft()


class ScriptedPool:
    def __init__(self, conn: ScriptedConnection) -> None:
        self.conn = conn

    def make_connection(self) -> ScriptedConnection:
        return self.conn


class Pipeline:
    """`_meta`'s transaction: HSETNX, then HMGET epoch seq."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def hsetnx(self, *args: Any) -> None:
        pass

    def hmget(self, *args: Any) -> None:
        pass

    def execute(self) -> list[Any]:
        return [0, [EPOCH.encode(), str(self.seq).encode()]]


class Commands:
    def __init__(self, seq: int) -> None:
        self.seq = seq

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self.seq)


class ScriptedHistory:
    """History reads that run `during` first: what happens while the hub waits on Redis."""

    def __init__(self, during: Callable[[], None]) -> None:
        self.during = during
        self.reads: list[tuple[list[str], Position]] = []

    def read(self, channels: Sequence[str], after: Position, *, check: bool = True) -> Replay:
        self.reads.append((list(channels), after))
        self.during()
        return Replay(after.epoch, after.seq)


def resumed_hub(conn: ScriptedConnection, history: ScriptedHistory, channel: str) -> tuple[Hub, Subscriber]:
    """A hub that was live at position 5 with one client on `channel`, now reconnecting."""
    hub = Hub(Config(), Commands(seq=7), history)  # type: ignore[arg-type]
    hub._pool = ScriptedPool(conn)  # type: ignore[assignment]
    hub._send_lock = Semaphore()
    hub.epoch, hub._epoch_b, hub.position = EPOCH, EPOCH.encode(), 5
    sub = Subscriber([channel], 1024)
    key = LIVE_PREFIX + channel.encode()
    hub._all.add(sub)
    hub._subs[key] = {sub}
    return hub, sub


def test_a_client_leaving_while_history_is_replayed_is_unsubscribed() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([[b"subscribe", key, 1]])
    hub: Hub
    history = ScriptedHistory(lambda: hub.detach(sub))
    hub, sub = resumed_hub(conn, history, "orders")

    hub._connect()

    assert history.reads == [(["orders"], Position(EPOCH, 5))], "the gap was filled from history"
    assert conn.sent[0] == ("SUBSCRIBE", key)
    # Its last client left during the replay: the subscription must not outlive it.
    assert ("UNSUBSCRIBE", key) in conn.sent
    assert hub.clients == 0 and not hub._subs and key not in hub._active


def test_a_client_staying_through_the_replay_stays_subscribed() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([[b"subscribe", key, 1]])
    hub, _sub = resumed_hub(conn, ScriptedHistory(lambda: None), "orders")

    hub._connect()

    assert conn.sent == [("SUBSCRIBE", key)]
    assert key in hub._active and hub.clients == 1
