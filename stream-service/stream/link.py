"""A link: one Redis Pub/Sub connection to one Redis node, shared by all streams
of the worker whose channels live in its partitions; read by one greenlet.

The connection is owned here: when it breaks, or goes quiet for longer than
the watchdog allows (a hung Redis sends nothing and raises nothing), the link
reconnects with backoff (on a cluster, after the hub followed the topology),
and the core resubscribes and replays from history every event its partitions
missed, so connected clients lose nothing.

A link feeds the core what Redis says and hands the core's answers to the hub
(`Wiring.do`); it knows nothing else of the hub. The hub decides which
partitions a link serves (`add`, `drop`) and sends commands through it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import redis
from gevent.lock import Semaphore
from redis.connection import ConnectionInterface

from . import metrics
from .actions import Action
from .core import Core
from .history import PartitionsMismatch
from .ids import Position
from .topology import Address

# A link's lines are the hub's: one logger for the worker's Redis Pub/Sub.
log = logging.getLogger("herald.stream.hub")


class WatchdogExpired(Exception):
    """Nothing came from Redis for longer than the watchdog allows."""


@dataclass(frozen=True, slots=True)
class Wiring:
    """What every link of a worker is given: the core it feeds, and the hub's callbacks."""

    core: Core
    # Carry out the core's actions (Hub._do).
    do: Callable[[list[Action]], None]
    # A partition's current epoch and sequence, before it comes up (History.meta).
    meta: Callable[[int, Position | None], Position]
    # The connection broke: the partitions may have moved (a failover).
    reconnecting: Callable[[], None]
    # Redis said a slot left this node (a MOVED, a dropped subscription).
    slot_left: Callable[[], None]
    # After each message: let the writers run during a burst (Hub._yield_if_busy).
    yield_if_busy: Callable[[], None]
    watchdog_seconds: float


class Link:
    """One Pub/Sub connection to the node at `address`, for the partitions added to it."""

    def __init__(self, address: Address, pool: redis.ConnectionPool, wiring: Wiring) -> None:
        self.address = address
        self.partitions: set[int] = set()  # assigned to this node
        self.up: set[int] = set()  # brought up on the current connection
        self.closed = False
        self._wiring = wiring
        self._core = wiring.core
        self._pool = pool
        self._conn: ConnectionInterface | None = None
        self._lock = Semaphore()
        self._greenlet = gevent.spawn(self._run)

    @property
    def healthy(self) -> bool:
        return self._conn is not None and self.up == self.partitions

    def add(self, number: int) -> None:
        self.partitions.add(number)
        if self._conn is not None:
            gevent.spawn(self._bring_up_now)

    def _bring_up_now(self) -> None:
        conn = self._conn
        try:
            self._bring_up_pending()
        except (redis.RedisError, OSError, PartitionsMismatch) as exc:
            log.warning("could not bring a partition up on %s:%d (%s); reconnecting", *self.address, exc)
            if conn is not None:
                conn.disconnect()  # the reader fails, and starts over

    def drop(self, number: int) -> None:
        """Partition `number` moved away: its subscriptions here are gone (or soon)."""
        self.partitions.discard(number)
        if number in self.up:
            self.up.discard(number)
            self._wiring.do(self._core.connection_lost([number]))

    def close(self) -> None:
        self.closed = True
        self._greenlet.kill(block=False)

    # -- the reader ---------------------------------------------------------

    def _run(self) -> None:
        core = self._core
        backoff = 0.05
        try:
            while not core.stopping and not self.closed:
                try:
                    self._connect()
                    backoff = 0.05
                    self._read_forever()
                except (redis.RedisError, OSError, WatchdogExpired) as exc:
                    if not core.stopping:
                        log.warning("Redis Pub/Sub connection to %s:%d lost (%s)", *self.address, exc)
                except PartitionsMismatch as exc:
                    log.error("cannot serve streams: %s", exc)
                except Exception:
                    # A bug must not silence the worker: log it and start over from history.
                    log.exception("the hub failed; reconnecting")
                finally:
                    self._disconnect()
                if core.stopping or self.closed:
                    break
                metrics.RECONNECTS.inc()
                self._wiring.reconnecting()
                gevent.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 2.0)
        finally:
            self._disconnect()

    def _connect(self) -> None:
        conn = self._pool.make_connection()
        conn.connect()
        self._conn = conn
        self._bring_up_pending()
        channels = self._core.channels_in(self.up)
        host, port = self.address
        log.info("Pub/Sub connected to %s:%d: %d partitions, %d channels", host, port, len(self.up), channels)

    def _bring_up_pending(self) -> None:
        """Bring up, on this connection, every assigned partition not up yet."""
        core, wiring = self._core, self._wiring
        while self._conn is not None and (pending := self.partitions - self.up):
            number = min(pending)
            now = wiring.meta(number, core.position_of(number))
            if number not in self.partitions or number in self.up or self._conn is None:
                continue  # it moved, or came up, while we asked
            self.up.add(number)
            wiring.do(core.connection_up(number, now.epoch, now.seq))

    def _read_forever(self) -> None:
        watchdog = self._wiring.watchdog_seconds
        assert self._conn is not None
        conn = self._conn
        core = self._core
        # The callbacks of the per-message path, looked up once.
        do, message, yield_if_busy = self._wiring.do, core.message, self._wiring.yield_if_busy
        last = time.monotonic()
        pinged = False
        while not core.stopping:
            if conn.can_read(timeout=min(1.0, watchdog / 4)):
                try:
                    reply = conn.read_response()
                except redis.ResponseError as exc:
                    # A SSUBSCRIBE refused with MOVED: that slot lives elsewhere now.
                    log.info("Redis at %s:%d answered %s; following the topology", *self.address, exc)
                    if isinstance(exc, redis.exceptions.MovedError) and exc.node_addr == self.address:
                        # Sent to the very node we meant to reach: this connection
                        # reached another node, which now has that node's old
                        # address (every node restarted on new addresses). Start
                        # over on a new connection, or the subscription stays lost.
                        raise redis.ConnectionError(f"not connected to {exc.host}:{exc.port}") from exc
                    self._wiring.slot_left()
                    continue
                last = time.monotonic()
                pinged = False
                kind = reply[0]
                if kind == b"smessage":
                    metrics.RECEIVED.inc()
                    do(message(reply[1], reply[2]))
                    yield_if_busy()
                elif kind == b"ssubscribe":
                    do(core.confirmed(reply[1]))
                elif kind == b"sunsubscribe" and core.holds(reply[1]):
                    # Redis dropped a subscription we hold: its slot moved away.
                    self._wiring.slot_left()
                # PING answers need nothing.
                continue
            idle = time.monotonic() - last
            if idle > watchdog:
                raise WatchdogExpired(f"no answer from Redis for {idle:.1f} s")
            if idle > watchdog / 2 and not pinged:
                self.send("PING")
                pinged = True

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        lost, self.up = self.up, set()
        if lost:
            self._wiring.do(self._core.connection_lost(lost))
        if conn is not None:
            conn.disconnect()

    # -- sending --------------------------------------------------------------

    def send(self, *args: Any) -> None:
        conn = self._conn
        if conn is None:
            raise redis.ConnectionError("not connected")
        with self._lock:
            conn.send_command(*args)

    def send_quietly(self, *args: Any) -> None:
        """Send a command; if the connection is broken the reader reconnects anyway."""
        try:
            self.send(*args)
        except (redis.RedisError, OSError) as exc:
            log.info("could not send %s (%s); the reconnect will catch up", args[0], exc)
