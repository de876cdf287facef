"""The hub: one Redis Pub/Sub connection per worker, fanned out to local clients.

A channel is subscribed in Redis when its first local client arrives and
unsubscribed when its last one leaves. Each live event is encoded to SSE bytes
once; the same bytes object goes into the buffer of every subscriber.

The hub owns its connection: when it breaks, or goes quiet for longer than the
watchdog allows (a hung Redis sends nothing and raises nothing), the hub
reconnects with backoff, re-subscribes, and replays from history every event
it missed, so connected clients lose nothing. Sequence numbers are global and
increasing, so the hub drops anything at or below the last one it dispatched.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import gevent
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.connection import ConnectionInterface, ConnectionPool

from . import metrics, sse
from .config import Config
from .history import META_KEY, History, HistoryEvent, Position, new_epoch
from .subscriber import CONTROL, Push, Subscriber, chunk

log = logging.getLogger("herald.stream.hub")

LIVE_PREFIX = b"herald:live:"


class Unavailable(Exception):
    """The hub cannot serve a new client now (Redis unreachable, shutting down)."""


class Full(Unavailable):
    """The worker holds MAX_CONNECTIONS streams already."""

    def __init__(self) -> None:
        super().__init__("this worker is at its connection limit")


class WatchdogExpired(Exception):
    """Nothing came from Redis for longer than the watchdog allows."""


def event_frame(epoch: bytes, seq: bytes, event: bytes, data: bytes) -> bytes:
    """The SSE frame of one event; its id is `<epoch>-<seq>`."""
    return sse.frame(data, event=event, id=epoch + b"-" + seq)


def reset_epoch(frame: bytes) -> bytes:
    """The epoch a reset frame moves its client to (its id comes first: `id: <epoch>-`)."""
    return frame[4:16]


def reset_frame(reason: str, position: Position) -> bytes:
    """A `reset` event: history cannot cover the gap; the client continues from `position`."""
    data = json.dumps({"reason": reason}).encode()
    return sse.frame(data, event=b"reset", id=str(position).encode())


class Hub:
    """Subscriptions, fan-out and recovery for one worker process."""

    def __init__(self, config: Config, commands: redis.Redis, history: History) -> None:
        self._config = config
        self._commands = commands
        self._history = history
        self._pool = ConnectionPool.from_url(
            config.redis_url,
            protocol=2,  # RESP2: Pub/Sub messages as plain replies on this connection
            socket_timeout=config.watchdog_seconds,
            socket_connect_timeout=config.subscribe_timeout_seconds,
        )
        self._conn: ConnectionInterface | None = None
        self._send_lock: Semaphore | None = None
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False
        self._filling = False
        self._changed = Event()  # replaced on every change; waiters wait on the old one
        self._subs: dict[bytes, set[Subscriber]] = {}
        self._all: set[Subscriber] = set()  # every attached client, for heartbeats
        self._pending: dict[bytes, int] = {}  # SUBSCRIBE commands not yet confirmed
        self._active: set[bytes] = set()  # confirmed, and history filled
        # Active, but no event dispatched since: events published between the
        # hub's position and the moment Redis ran the SUBSCRIBE were never
        # dispatched, so a client starting now must read them from history.
        self._fresh: set[bytes] = set()
        self.epoch: str | None = None
        self._epoch_b = b""
        self.position = 0  # the last sequence number dispatched
        # Bytes dispatched since the hub last let clients run; see _yield_if_busy.
        self._burst = 0
        self._burst_limit = max(config.client_buffer_bytes // 4, 1)

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Start the reader greenlet (once, in the worker that serves clients)."""
        if self._greenlet is None:
            self._send_lock = Semaphore()
            self._greenlet = gevent.spawn(self._run)
            gevent.spawn(self._heartbeats)

    def shutdown(self) -> None:
        """End every stream cleanly (the worker is stopping) and stop reading."""
        self._stopping = True
        for sub in set(self._all):
            sub.close("shutdown")
        self._broadcast()

    @property
    def clients(self) -> int:
        """Streams attached to this worker."""
        return len(self._all)

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._filling

    def snapshot(self) -> dict[str, Any]:
        """Gauges and counters of this worker, for /stats and the tests."""
        return {
            "clients": self.clients,
            "channels": len(self._subs),
            "subscribed": len(self._active),
            "connected": self.connected,
            "epoch": self.epoch,
            "position": self.position,
            "delivered": metrics.this_worker(metrics.DELIVERED),
            "dropped_slow": metrics.this_worker(metrics.DROPPED_SLOW),
            "reconnects": metrics.this_worker(metrics.RECONNECTS),
            "resets": metrics.this_worker(metrics.RESETS),
            "resumes": metrics.this_worker(metrics.RESUMES),
        }

    def note_resume(self) -> None:
        """Count a stream opened with a last event id (for /stats and /metrics)."""
        metrics.RESUMES.inc()

    def note_resets(self, reason: str, count: int = 1) -> None:
        """Count reset events sent to clients (for /stats and /metrics)."""
        metrics.RESETS.labels(reason).inc(count)

    # -- clients ----------------------------------------------------------

    def attach(self, sub: Subscriber) -> tuple[Position, bool]:
        """Register `sub` and wait until all its channels are live.

        Returns the position from which the hub delivers to it, and whether any
        of its channels was not live yet (events published on those before the
        subscription took effect must come from history). Raises Full when the
        worker holds MAX_CONNECTIONS streams, Unavailable when it cannot serve;
        either way `sub` is not attached then.
        """
        if self._stopping:
            raise Unavailable("the worker is shutting down")
        if len(self._all) >= self._config.max_connections:
            raise Full()
        # The slot is taken before anything waits: streams opened together
        # (during a reconnect, say) cannot all pass the limit.
        self._all.add(sub)
        metrics.CLIENTS.inc()
        try:
            return self._subscribe(sub)
        except BaseException:
            self.detach(sub)
            raise

    def _subscribe(self, sub: Subscriber) -> tuple[Position, bool]:
        self.start()
        deadline = time.monotonic() + self._config.subscribe_timeout_seconds
        if not self._wait(lambda: self.connected, deadline):
            raise Unavailable("Redis is not reachable")
        assert self.epoch is not None
        keys = [LIVE_PREFIX + c.encode() for c in sub.channels]
        # Not live yet (new here, awaiting another client's SUBSCRIBE, or live so
        # recently that the hub's position may lag behind the subscription):
        # what lies between the position and the live events comes from history.
        not_live = any(key not in self._active or key in self._fresh for key in keys)
        new = []
        for key in keys:
            subs = self._subs.get(key)
            if subs is None:
                subs = self._subs[key] = set()
                new.append(key)
            subs.add(sub)
        start = Position(self.epoch, self.position)
        to_send = [k for k in new if k not in self._pending]
        if to_send:
            for key in to_send:
                self._pending[key] = self._pending.get(key, 0) + 1
            self._send_quietly("SUBSCRIBE", *to_send)
        if not self._wait(lambda: all(k in self._active for k in keys), deadline):
            raise Unavailable("the subscription did not take effect in time")
        return start, not_live

    def detach(self, sub: Subscriber) -> None:
        """Forget `sub` (once; later calls do nothing); unsubscribe channels it
        was the last local client of."""
        if sub not in self._all:
            return
        self._all.discard(sub)
        metrics.CLIENTS.dec()
        gone = []
        for channel in sub.channels:
            key = LIVE_PREFIX + channel.encode()
            subs = self._subs.get(key)
            if subs is None:
                continue
            subs.discard(sub)
            if not subs:
                del self._subs[key]
                if key in self._active:
                    self._active.discard(key)
                    gone.append(key)
                elif self._filling and key not in self._pending:
                    # Confirmed during a reconnect while the gap is being filled:
                    # subscribed in Redis, though not active yet.
                    gone.append(key)
                # A channel still pending is unsubscribed when its confirmation arrives.
        if gone:
            self._send_quietly("UNSUBSCRIBE", *gone)

    def _heartbeats(self) -> None:
        """One timer for the worker: a comment to every idle live client per interval.

        Clients on the fast path sleep without a timeout of their own, which
        saves a timer per stream and per wait; busy clients need no heartbeat.
        """
        plain = sse.comment(b"hb")
        framed = chunk(plain)
        while not self._stopping:
            gevent.sleep(self._config.heartbeat_seconds)
            for sub in list(self._all):
                sub.beat(framed, plain)

    # -- the reader greenlet ------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                self._connect()
                backoff = 0.05
                self._read_forever()
            except (redis.RedisError, OSError, WatchdogExpired) as exc:
                if not self._stopping:
                    log.warning("Redis Pub/Sub connection lost (%s); reconnecting", exc)
            except Exception:
                # A bug must not silence the worker: log it and start over from history.
                log.exception("the hub failed; reconnecting")
            finally:
                self._disconnect()
            if self._stopping:
                break
            metrics.RECONNECTS.inc()
            gevent.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 2.0)

    def _connect(self) -> None:
        conn = self._pool.make_connection()
        conn.connect()
        self._conn = conn
        self._filling = True
        resumed = self.epoch is not None
        epoch, seq = self._meta()
        if self.epoch is not None and (epoch != self.epoch or seq < self.position):
            self._reset_all("epoch_changed", Position(epoch, seq))
            resumed = False
        if not resumed:
            self.epoch, self._epoch_b, self.position = epoch, epoch.encode(), seq
        self._active.clear()
        self._pending = {key: 1 for key in self._subs}
        if self._pending:
            self._send("SUBSCRIBE", *self._pending)
        held = self._await_confirmations()
        if resumed and self._subs:
            self._fill_gap()
        for channel, payload in held:
            self._on_message(channel, payload)
        self._filling = False
        self._active.update(k for k in self._subs if k not in self._pending)
        self._broadcast()
        log.info(
            "Pub/Sub connected: epoch %s, position %d, %d channels",
            self.epoch,
            self.position,
            len(self._subs),
        )

    def _meta(self) -> tuple[str, int]:
        pipe = self._commands.pipeline(transaction=True)
        pipe.hsetnx(META_KEY, "epoch", new_epoch())
        pipe.hmget(META_KEY, "epoch", "seq")
        _, (epoch, seq) = pipe.execute()
        return epoch.decode(), int(seq or 0)

    def _await_confirmations(self) -> list[tuple[bytes, bytes]]:
        """Read until every pending SUBSCRIBE is confirmed, holding back events."""
        held: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + self._config.subscribe_timeout_seconds
        while self._pending:
            reply = self._read(deadline)
            if reply[0] == b"message":
                held.append((reply[1], reply[2]))
            else:
                self._on_control(reply)
        return held

    def _fill_gap(self) -> None:
        """Dispatch, from history, what was published while the hub was away."""
        channels = [k[len(LIVE_PREFIX) :].decode() for k in self._subs]
        assert self.epoch is not None
        replay = self._history.read(channels, Position(self.epoch, self.position), check=False)
        for e in replay.events:
            self._dispatch_history(e)
            self._yield_if_busy()

    def _dispatch_history(self, e: HistoryEvent) -> None:
        seqb = str(e.seq).encode()
        self._dispatch(
            LIVE_PREFIX + e.channel.encode(), e.seq, event_frame(self._epoch_b, seqb, e.event, e.data)
        )

    def _read_forever(self) -> None:
        watchdog = self._config.watchdog_seconds
        assert self._conn is not None
        conn = self._conn
        last = time.monotonic()
        pinged = False
        while not self._stopping:
            if conn.can_read(timeout=min(1.0, watchdog / 4)):
                reply = conn.read_response()
                last = time.monotonic()
                pinged = False
                if reply[0] == b"message":
                    self._on_message(reply[1], reply[2])
                    self._yield_if_busy()
                else:
                    self._on_control(reply)
                continue
            idle = time.monotonic() - last
            if idle > watchdog:
                raise WatchdogExpired(f"no answer from Redis for {idle:.1f} s")
            if idle > watchdog / 2 and not pinged:
                self._send("PING")
                pinged = True

    def _read(self, deadline: float) -> Any:
        assert self._conn is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._conn.can_read(timeout=remaining):
            raise WatchdogExpired("Redis did not confirm the subscriptions in time")
        return self._conn.read_response()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._filling = False
        self._active.clear()
        self._fresh.clear()
        self._pending.clear()
        if conn is not None:
            conn.disconnect()
        self._broadcast()

    # -- dispatch ----------------------------------------------------------

    def _on_control(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind != b"subscribe":
            return  # unsubscribe confirmations and PING answers need nothing
        key = reply[1]
        left = self._pending.get(key, 0) - 1
        if left > 0:
            self._pending[key] = left
            return
        self._pending.pop(key, None)
        if key not in self._subs:
            self._send_quietly("UNSUBSCRIBE", key)  # its last client left while pending
        elif not self._filling:
            self._active.add(key)
            self._fresh.add(key)
            self._broadcast()

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        try:
            epoch, seqb, event, data = payload.split(b" ", 3)
            seq = int(seqb)
        except ValueError:
            log.error("ignoring a malformed Pub/Sub message on %r", channel)
            return
        if epoch != self._epoch_b:
            # Redis lost its data while we stayed connected: a new epoch began.
            new = epoch.decode()
            self._reset_all("epoch_changed", Position(new, seq - 1))
            self.epoch, self._epoch_b, self.position = new, epoch, 0
        if seq <= self.position:
            return  # already dispatched from history during recovery
        metrics.RECEIVED.inc()
        try:
            frame = event_frame(epoch, seqb, event, data)
        except ValueError:
            log.error("ignoring event %d with a malformed name on %r", seq, channel)
            return
        self._dispatch(channel, seq, frame)

    def _dispatch(self, channel: bytes, seq: int, frame: bytes) -> None:
        self.position = seq
        if self._fresh:
            self._fresh.clear()  # the position is now past every subscription made so far
        subs = self._subs.get(channel)
        if not subs:
            return
        self._burst += len(frame)
        framed = chunk(frame)  # once for every subscriber the hub writes to directly
        outcomes = [sub.push(seq, frame, framed) for sub in subs]
        delivered = outcomes.count(Push.DELIVERED)
        if delivered:
            metrics.DELIVERED.inc(delivered)
        dropped = outcomes.count(Push.DROPPED)
        if dropped:
            metrics.DROPPED_SLOW.inc(dropped)

    def _yield_if_busy(self) -> None:
        """Let clients write out their buffers during a burst of events.

        While Redis has more data buffered the reader never waits, so without
        this a burst would pile up in every buffer, and healthy clients would be
        dropped as slow. Yielding per quarter buffer keeps the switches per event low.
        """
        if self._burst >= self._burst_limit:
            self._burst = 0
            gevent.sleep(0)

    def _reset_all(self, reason: str, position: Position) -> None:
        frame = reset_frame(reason, position)
        subs = set(self._all)
        for sub in subs:
            sub.push(CONTROL, frame)
        self.note_resets(reason, len(subs))
        log.warning("epoch changed to %s: %d clients told to reset", position.epoch, len(subs))

    # -- helpers -----------------------------------------------------------

    def _send(self, *args: Any) -> None:
        conn = self._conn
        if conn is None:
            raise redis.ConnectionError("not connected")
        assert self._send_lock is not None
        with self._send_lock:
            conn.send_command(*args)

    def _send_quietly(self, *args: Any) -> None:
        """Send a command; if the connection is broken the reader reconnects anyway."""
        try:
            self._send(*args)
        except (redis.RedisError, OSError) as exc:
            log.info("could not send %s (%s); the reconnect will catch up", args[0], exc)

    def _broadcast(self) -> None:
        changed, self._changed = self._changed, Event()
        changed.set()

    def _wait(self, condition: Any, deadline: float) -> bool:
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                return False
            self._changed.wait(remaining)
        return True
