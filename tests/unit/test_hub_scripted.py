"""The hub driven with scripted Redis replies (no Redis, no sockets).

The Pub/Sub connection is a script of replies, in the way redis-py's own tests
script `read_response`; the commands the hub sends are recorded.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import pytest
from gevent.lock import Semaphore
from stream import metrics
from stream.config import Config
from stream.history import HistoryEvent, Position, Replay
from stream.hub import LIVE_PREFIX, Hub, Unavailable
from stream.subscriber import Subscriber

from tests.support.sse import SSEParser

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

    def __init__(self, seq: int, epoch: str) -> None:
        self.seq = seq
        self.epoch = epoch

    def hsetnx(self, *args: Any) -> None:
        pass

    def hmget(self, *args: Any) -> None:
        pass

    def execute(self) -> list[Any]:
        return [0, [self.epoch.encode(), str(self.seq).encode()]]


class Commands:
    """The hub's command client: only `_meta`'s pipeline is used on reconnect."""

    def __init__(self, seq: int, epoch: str = EPOCH) -> None:
        self.seq = seq
        self.epoch = epoch

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self.seq, self.epoch)


class ScriptedHistory:
    """History reads that run `during` first: what happens while the hub waits on Redis."""

    def __init__(self, during: Callable[[], None], events: Sequence[HistoryEvent] = ()) -> None:
        self.during = during
        self.events = list(events)
        self.reads: list[tuple[list[str], Position]] = []

    def read(self, channels: Sequence[str], after: Position, *, check: bool = True) -> Replay:
        self.reads.append((list(channels), after))
        self.during()
        newest = max([after.seq] + [e.seq for e in self.events])
        return Replay(after.epoch, newest, [e for e in self.events if e.seq > after.seq])


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


# --- what clients receive: held, replayed and live events; epochs; shutdown ----------


def message(channel: str, seq: int, data: str, epoch: str = EPOCH) -> list[Any]:
    """A Pub/Sub message as the publish script sends it: `<epoch> <seq> <event> <data>`."""
    return [b"message", LIVE_PREFIX + channel.encode(), f"{epoch} {seq} message {data}".encode()]


def received(sub: Subscriber) -> list[tuple[str, str, str]]:
    """(id, event, data) of every event queued for `sub`, parsed as a browser would."""
    parser = SSEParser()
    frames = parser.feed(b"".join(frame for _, frame in sub.take(0)))
    return [(f.event.id, f.event.event, f.event.data) for f in frames if f.event is not None]


def test_held_replayed_and_live_events_reach_a_client_once_each_in_order() -> None:
    key = LIVE_PREFIX + b"orders"
    # While the SUBSCRIBE is being confirmed, event 7 already arrives live (held
    # back); history then holds 6 and 7; event 8 comes live afterwards.
    conn = ScriptedConnection([message("orders", 7, '"seven"'), [b"subscribe", key, 1]])
    replayed = [
        HistoryEvent(6, "orders", b"message", b'"six"'),
        HistoryEvent(7, "orders", b"message", b'"seven"'),
    ]
    history = ScriptedHistory(lambda: None, replayed)
    hub, sub = resumed_hub(conn, history, "orders")

    hub._connect()
    hub._on_message(*message("orders", 8, '"eight"')[1:])

    assert received(sub) == [
        (f"{EPOCH}-6", "message", '"six"'),
        (f"{EPOCH}-7", "message", '"seven"'),
        (f"{EPOCH}-8", "message", '"eight"'),
    ]
    assert hub.position == 8


def test_an_epoch_change_on_the_live_path_resets_every_client_first() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([[b"subscribe", key, 1]])
    hub, sub = resumed_hub(conn, ScriptedHistory(lambda: None), "orders")
    hub._connect()

    new = "fedcba987654"
    hub._on_message(*message("orders", 1, '"first of the new epoch"', epoch=new)[1:])

    (reset, event) = received(sub)
    assert reset[1] == "reset" and json.loads(reset[2]) == {"reason": "epoch_changed"}
    assert reset[0] == f"{new}-0"  # the client continues from the start of the new epoch
    assert event == (f"{new}-1", "message", '"first of the new epoch"')
    assert hub.epoch == new


def test_an_epoch_change_found_on_reconnect_resets_every_client() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([[b"subscribe", key, 1]])
    history = ScriptedHistory(lambda: None)
    hub, sub = resumed_hub(conn, history, "orders")
    hub._commands = Commands(seq=3, epoch="fedcba987654")  # type: ignore[assignment]

    hub._connect()

    ((reset_id, kind, data),) = received(sub)
    assert (kind, json.loads(data)) == ("reset", {"reason": "epoch_changed"})
    assert reset_id == "fedcba987654-3"
    assert history.reads == []  # nothing of the old epoch is replayed
    assert (hub.epoch, hub.position) == ("fedcba987654", 3)


def test_shutdown_ends_every_stream() -> None:
    conn = ScriptedConnection([[b"subscribe", LIVE_PREFIX + b"orders", 1]])
    hub, sub = resumed_hub(conn, ScriptedHistory(lambda: None), "orders")
    hub._connect()

    hub.shutdown()

    assert sub.closed == "shutdown"
    with pytest.raises(Unavailable, match="shutting down"):
        hub.attach(Subscriber(["orders"], 1024))


# --- clients arriving and falling behind -------------------------------------------


def connected_hub(conn: ScriptedConnection) -> Hub:
    """A live hub with no clients yet, whose reader is not running (the test reads)."""
    hub = Hub(Config(), Commands(seq=5), ScriptedHistory(lambda: None))  # type: ignore[arg-type]
    hub._conn = conn  # type: ignore[assignment]
    hub._send_lock = Semaphore()
    hub._greenlet = gevent.getcurrent()  # start() spawns nothing
    hub.epoch, hub._epoch_b, hub.position = EPOCH, EPOCH.encode(), 5
    return hub


def test_two_clients_racing_on_a_new_channel_share_one_subscribe() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([])
    hub = connected_hub(conn)
    first, second = Subscriber(["orders"], 1024), Subscriber(["orders"], 1024)
    attaching = [gevent.spawn(hub.attach, first), gevent.spawn(hub.attach, second)]
    gevent.sleep(0)  # both are now waiting for the subscription

    assert conn.sent == [("SUBSCRIBE", key)]
    assert hub.clients == 2 and not any(g.ready() for g in attaching)
    hub._on_control([b"subscribe", key, 1])
    gevent.joinall(attaching, timeout=1, raise_error=True)

    # Both start at the hub's position, and both read the gap from history
    # (the channel was not live before them).
    assert [g.value for g in attaching] == [(Position(EPOCH, 5), True)] * 2
    assert key in hub._active and not hub._pending


def test_a_client_that_falls_too_far_behind_is_cut_and_counted() -> None:
    key = LIVE_PREFIX + b"orders"
    conn = ScriptedConnection([])
    hub = connected_hub(conn)
    hub._active.add(key)
    slow, fine = Subscriber(["orders"], 200), Subscriber(["orders"], 10_000)
    for sub in (slow, fine):
        hub._all.add(sub)
        hub._subs.setdefault(key, set()).add(sub)
    dropped = metrics.this_worker(metrics.DROPPED_SLOW)
    delivered = metrics.this_worker(metrics.DELIVERED)

    for seq in range(6, 10):
        hub._on_message(*message("orders", seq, '"' + "x" * 60 + '"')[1:])

    assert slow.closed == "slow"
    assert [e[0] for e in received(fine)] == [f"{EPOCH}-{s}" for s in range(6, 10)]
    assert metrics.this_worker(metrics.DROPPED_SLOW) == dropped + 1
    # The slow client counted until it was cut, and nothing after.
    assert metrics.this_worker(metrics.DELIVERED) == delivered + 4 + 1
