"""The hub: the worker's adapter between the core, Redis and the writers.

One Redis Pub/Sub connection per worker, read by one greenlet, feeds the core
(core.py) and carries out what it decides: (un)subscribe, read the gap after a
reconnect, hand each event's bytes to the writers of its live streams. One
clock greenlet drives heartbeats and token expiry. Counters live here, in the
Prometheus metrics, the one record behind both /stats and /metrics.

The connection is owned here: when it breaks, or goes quiet for longer than the
watchdog allows (a hung Redis sends nothing and raises nothing), the hub
reconnects with backoff, and the core resubscribes and replays from history
every event it missed, so connected clients lose nothing.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import gevent
import redis
from gevent.event import Event
from gevent.lock import Semaphore
from redis.connection import ConnectionInterface, ConnectionPool

from . import metrics
from .config import Config
from .core import (
    Action,
    Beat,
    Core,
    Deliver,
    End,
    Full,
    Malformed,
    Position,
    ReadGap,
    Ready,
    Replay,
    Reset,
    Stream,
    StreamState,
    Subscribe,
    Unavailable,
    Unsubscribe,
)
from .history import History
from .writer import chunk

log = logging.getLogger("herald.stream.hub")

__all__ = ["Full", "Hub", "Unavailable"]


class WatchdogExpired(Exception):
    """Nothing came from Redis for longer than the watchdog allows."""


class Hub:
    """Subscriptions, fan-out and recovery for one worker process."""

    def __init__(self, config: Config, history: History) -> None:
        self._config = config
        self._history = history
        self.core = Core(
            max_streams=config.max_connections,
            queue_limit_bytes=config.client_buffer_bytes,
            retry_ms=config.retry_ms,
        )
        self._pool = ConnectionPool.from_url(
            config.redis_url,
            protocol=2,  # RESP2: Pub/Sub messages as plain replies on this connection
            socket_timeout=config.watchdog_seconds,
            socket_connect_timeout=config.subscribe_timeout_seconds,
        )
        self._conn: ConnectionInterface | None = None
        self._send_lock: Semaphore | None = None
        self._greenlet: gevent.Greenlet | None = None
        self._waiters: dict[Stream, Event] = {}  # streams waiting for their channels
        # Bytes dispatched since the hub last let clients run; see _yield_if_busy.
        self._burst = 0
        self._burst_limit = max(config.client_buffer_bytes // 4, 1)

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Start the reader and the clock (once, in the worker that serves clients)."""
        if self._greenlet is None:
            self._send_lock = Semaphore()
            self._greenlet = gevent.spawn(self._run)
            gevent.spawn(self._clock)

    def shutdown(self) -> None:
        """End every stream cleanly (the worker is stopping) and stop reading."""
        self._do(self.core.shutdown())
        for waiter in self._waiters.values():
            waiter.set()

    @property
    def clients(self) -> int:
        """Streams open on this worker."""
        return len(self.core.streams)

    def snapshot(self) -> dict[str, Any]:
        """Gauges and counters of this worker, for /stats and the tests."""
        core = self.core
        return {
            "clients": self.clients,
            "channels": len(core.channels),
            "subscribed": core.live_channels(),
            "connected": core.ready,
            "epoch": core.epoch,
            "position": core.position,
            "delivered": metrics.this_worker(metrics.DELIVERED),
            "dropped_slow": metrics.this_worker(metrics.DROPPED_SLOW),
            "reconnects": metrics.this_worker(metrics.RECONNECTS),
            "resets": metrics.this_worker(metrics.RESETS),
            "resumes": metrics.this_worker(metrics.RESUMES),
        }

    # -- streams ------------------------------------------------------------

    def open(self, stream: Stream) -> None:
        """Open `stream` and wait until its channels are live (state CATCHING_UP).

        Raises Full at MAX_CONNECTIONS, Unavailable when the worker cannot
        serve it in time; either way the stream is not open then.
        """
        self.start()
        actions = self.core.open(stream)
        metrics.CLIENTS.set(self.clients)
        try:
            self._do(actions)
            self._wait_ready(stream)
        except BaseException:
            self.leave(stream)
            raise
        if stream.resume is not None:
            metrics.RESUMES.inc()

    def _wait_ready(self, stream: Stream) -> None:
        if stream.state is StreamState.WAITING:
            waiter = self._waiters[stream] = Event()
            try:
                waiter.wait(self._config.subscribe_timeout_seconds)
            finally:
                del self._waiters[stream]
        if stream.state is StreamState.WAITING:
            if not self.core.connected:
                raise Unavailable("Redis is not reachable")
            raise Unavailable("the subscription did not take effect in time")
        if stream.state is StreamState.CLOSED:
            raise Unavailable("the worker is shutting down")

    def read_history(self, stream: Stream) -> Replay | None:
        """What `stream` needs from history before it goes live (None: nothing).

        Raises Unavailable (and leaves) if history cannot be read.
        """
        request = stream.history
        if request is None:
            return None
        try:
            replay = self._history.read(stream.channels, request.after, check=request.check)
        except redis.RedisError as exc:
            self.leave(stream)
            raise Unavailable(f"history could not be read: {exc}") from exc
        if replay.reset:
            metrics.RESETS.labels(replay.reset).inc()
        return replay

    def go_live(self, stream: Stream, replay: Replay | None) -> bytes:
        """`stream` caught up: what to write first; from now on events go to its writer."""
        return self.core.caught_up(stream, replay)

    def leave(self, stream: Stream, reason: str = "gone") -> None:
        """The stream is over (idempotent): end it, unsubscribe what no one else needs."""
        self._do(self.core.leave(stream, reason))

    # -- carrying out the core's decisions -----------------------------------

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Deliver:
                self._deliver(action.frame, action.streams)
            elif isinstance(action, Subscribe):
                self._send_quietly("SUBSCRIBE", *action.keys)
            elif isinstance(action, Unsubscribe):
                self._send_quietly("UNSUBSCRIBE", *action.keys)
            elif isinstance(action, Ready):
                waiter = self._waiters.get(action.stream)
                if waiter is not None:
                    waiter.set()
            elif isinstance(action, Reset):
                self._deliver(action.frame, action.streams, count=False)
                metrics.RESETS.labels(action.reason).inc(len(action.streams))
                log.warning("epoch changed: %d streams told to reset", len(action.streams))
            elif isinstance(action, Beat):
                for stream in action.streams:
                    stream.writer.beat()
            elif isinstance(action, End):
                self._end(action)
            elif isinstance(action, ReadGap):
                self._read_gap(action)
            elif isinstance(action, Malformed):
                log.error("ignoring a malformed Pub/Sub message on %r", action.key)

    def _deliver(self, frame: bytes, streams: list[Stream], *, count: bool = True) -> None:
        """The fast path: each live stream's writer gets the same bytes at once."""
        self._burst += len(frame)
        data = (frame, chunk(frame))
        delivered = 0
        for stream in streams:
            writer = stream.writer
            if writer.send(data[writer.chunked]):
                delivered += 1
        if count and delivered:
            metrics.DELIVERED.inc(delivered)

    def _end(self, action: End) -> None:
        """Every stream's end passes here once: its writer, its waiter, the counters."""
        if action.reason == "slow":
            metrics.DROPPED_SLOW.inc()
        waiter = self._waiters.get(action.stream)
        if waiter is not None:
            waiter.set()
        if action.stream.writer is not None:
            action.stream.writer.end(action.frame)
        metrics.CLIENTS.set(self.clients)

    def _read_gap(self, action: ReadGap) -> None:
        """Dispatch, from history, what was published while the hub was away."""
        replay = self._history.read(action.channels, action.after, check=False)
        self._do(self.core.gap_read(replay))

    # -- the clock ----------------------------------------------------------

    def _clock(self) -> None:
        """Heartbeats for idle live streams every interval; token expiry on time."""
        interval = self._config.heartbeat_seconds
        next_beat = time.monotonic() + interval
        while not self.core.stopping:
            expiry = self.core.next_expiry()
            wall = time.time()
            until_expiry = float("inf") if expiry is None else expiry - wall
            gevent.sleep(max(0.0, min(next_beat - time.monotonic(), until_expiry, 1.0)))
            if time.monotonic() >= next_beat:
                next_beat += interval
                self._do(self.core.tick(time.time()))
            else:
                self._do(self.core.expire(time.time()))

    # -- the reader greenlet ------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self.core.stopping:
            try:
                self._connect()
                backoff = 0.05
                self._read_forever()
            except (redis.RedisError, OSError, WatchdogExpired) as exc:
                if not self.core.stopping:
                    log.warning("Redis Pub/Sub connection lost (%s); reconnecting", exc)
            except Exception:
                # A bug must not silence the worker: log it and start over from history.
                log.exception("the hub failed; reconnecting")
            finally:
                self._disconnect()
            if self.core.stopping:
                break
            metrics.RECONNECTS.inc()
            gevent.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 2.0)

    def _connect(self) -> None:
        conn = self._pool.make_connection()
        conn.connect()
        self._conn = conn
        core = self.core
        now = self._history.meta(Position(core.epoch, core.position) if core.epoch else None)
        self._do(core.connection_up(now.epoch, now.seq))
        log.info(
            "Pub/Sub connected: epoch %s, position %d, %d channels",
            self.core.epoch,
            self.core.position,
            len(self.core.channels),
        )

    def _read_forever(self) -> None:
        watchdog = self._config.watchdog_seconds
        assert self._conn is not None
        conn = self._conn
        core = self.core
        last = time.monotonic()
        pinged = False
        while not core.stopping:
            if conn.can_read(timeout=min(1.0, watchdog / 4)):
                reply = conn.read_response()
                last = time.monotonic()
                pinged = False
                kind = reply[0]
                if kind == b"message":
                    metrics.RECEIVED.inc()
                    self._do(core.message(reply[1], reply[2]))
                    self._yield_if_busy()
                elif kind == b"subscribe":
                    self._do(core.confirmed(reply[1]))
                # Unsubscribe confirmations and PING answers need nothing.
                continue
            idle = time.monotonic() - last
            if idle > watchdog:
                raise WatchdogExpired(f"no answer from Redis for {idle:.1f} s")
            if idle > watchdog / 2 and not pinged:
                self._send("PING")
                pinged = True

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._do(self.core.connection_lost())
        if conn is not None:
            conn.disconnect()

    def _yield_if_busy(self) -> None:
        """Let the event loop write queued bytes out during a burst of events.

        While Redis has more data buffered the reader never waits, so without
        this a burst would pile up in every writer's queue, and healthy clients
        would be cut as slow. Yielding per quarter buffer keeps the switches per event low.
        """
        if self._burst >= self._burst_limit:
            self._burst = 0
            gevent.sleep(0)

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
