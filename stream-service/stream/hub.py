"""The hub: the worker's adapter between the core, Redis and the writers.

One Redis Pub/Sub connection per Redis node per worker (a `Link`, link.py: on
a single server, one), read by one greenlet each, feeds the core (core.py);
the hub carries out what the core decides: (un)subscribe, read the gap after a
reconnect, hand each event's bytes to the writers of its live streams. One
clock greenlet drives heartbeats, token expiry and presence (presence.py).
Counters live here, in the Prometheus metrics, the one record behind both
/stats and /metrics.

The links are owned here: the hub creates one per node and gives it the
partitions that node owns. When a connection breaks, or goes quiet for longer
than the watchdog allows (a hung Redis sends nothing and raises nothing), its
link reconnects with backoff, and the core resubscribes and replays from
history every event its partitions missed, so connected clients lose nothing.
On a cluster the hub also follows the topology (topology.py): after a
failover or a slot migration each partition moves to the link of its new
node, and comes up there the same way.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import gevent
import redis
from gevent.event import Event

from . import metrics
from .actions import Action, Beat, Deliver, End, Malformed, ReadGap, Ready, Reset, Subscribe, Unsubscribe
from .config import Config
from .core import Core, Full, Unavailable
from .history import History
from .link import Link, Wiring
from .presence import Presence
from .records import HistoryRequest, Replay, Stream, StreamState
from .topology import Address, Topology
from .writer import chunk

log = logging.getLogger("herald.stream.hub")

# Pages of history: at most this many events per read (and, for a stream
# catching up, no more bytes than its CLIENT_BUFFER_BYTES; for the worker's
# own gap after a reconnect, GAP_BYTES).
PAGE_EVENTS = 1000
GAP_BYTES = 1 << 20
# After Redis says a slot left a node, how long the hub keeps re-reading the
# slot map until it shows where the slot went (see Hub._replan_soon).
SETTLE_SECONDS = 10.0

__all__ = ["Full", "Hub", "Unavailable"]


class Hub:
    """Subscriptions, fan-out and recovery for one worker process."""

    def __init__(self, config: Config, history: History, topology: Topology) -> None:
        self._config = config
        self._history = history
        self.core = Core(
            max_streams=config.max_connections,
            queue_limit_bytes=config.client_buffer_bytes,
            retry_ms=config.retry_ms,
            partitions=config.partitions,
        )
        self._topology = topology
        delay = config.webhook_vacated_delay_seconds if config.webhooks else None
        self.presence = Presence(topology.client, config.presence_ttl_seconds, delay)
        self._links: dict[Address, Link] = {}  # one Pub/Sub link per Redis node
        self._owner: dict[int, Link] = {}  # the link each partition is on
        self._replanner: gevent.Greenlet | None = None
        self._settle_until = 0.0  # see _replan_soon
        self._started = False
        self._waiters: dict[Stream, Event] = {}  # streams waiting for their channels
        # Bytes dispatched since the hub last let clients run; see _yield_if_busy.
        self._burst = 0
        self._burst_limit = max(config.client_buffer_bytes // 4, 1)
        # What each link is given: the core to feed, and these callbacks (link.py).
        self._wiring = Wiring(
            core=self.core,
            do=self._do,
            meta=history.meta,
            reconnecting=self._replan_soon,
            slot_left=lambda: self._replan_soon(settle=SETTLE_SECONDS),
            yield_if_busy=self._yield_if_busy,
            watchdog_seconds=config.watchdog_seconds,
        )

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Start the links and the clock (once, in the worker that serves clients)."""
        if not self._started:
            self._started = True
            self._plan(refresh=False)
            if not self._links:
                self._replan_soon()  # the cluster was unreachable: keep trying
            gevent.spawn(self._clock)

    def shutdown(self) -> None:
        """End every stream cleanly (the worker is stopping) and stop reading; once."""
        if self.core.stopping:
            return
        self._do(self.core.shutdown())
        for waiter in self._waiters.values():
            waiter.set()
        for link in self._links.values():
            link.close()
        self.presence.clear()

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
            "partitions": len(core.parts),
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

    def read_history(self, stream: Stream) -> dict[int, Replay] | None:
        """The first page of what `stream` needs from history before it goes
        live, per partition (None: nothing).

        Raises Unavailable (and leaves) if history cannot be read.
        """
        request = self.core.next_read(stream)
        if request is None:
            if stream.reset:
                metrics.RESETS.labels(stream.reset).inc()
            return None
        return self._read_page(stream, request)

    def go_live(self, stream: Stream, replays: dict[int, Replay] | None) -> bytes:
        """What to write first to `stream`; if it is LIVE after this, events go to
        its writer from now on, else `next_page` reads on."""
        return self.core.caught_up(stream, replays)

    def next_page(self, stream: Stream) -> bytes:
        """The next page of `stream`'s catch-up, as frames; it may be LIVE after this.

        Raises Unavailable (and leaves) if history cannot be read.
        """
        request = self.core.next_read(stream)
        if request is None:
            return b""
        return self.core.replayed(stream, self._read_page(stream, request))

    def _read_page(self, stream: Stream, request: HistoryRequest) -> dict[int, Replay]:
        budget = self._config.client_buffer_bytes
        replays = {}
        try:
            for number, channels in request.channels.items():
                if request.check:
                    after = request.after[number]
                    page = self._history.page(number, channels, after=after, most=PAGE_EVENTS, budget=budget)
                    replays[number] = page
                else:
                    replays[number] = self._history.now(number)
        except redis.RedisError as exc:
            self.leave(stream)
            raise Unavailable(f"history could not be read: {exc}") from exc
        reset = stream.reset or next((r.reset for r in replays.values() if r.reset), None)
        if reset:
            metrics.RESETS.labels(reset).inc()
        return replays

    def leave(self, stream: Stream, reason: str = "gone") -> None:
        """The stream is over (idempotent): end it, unsubscribe what no one else needs."""
        self._do(self.core.leave(stream, reason))

    # -- carrying out the core's decisions -----------------------------------

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if type(action) is Deliver:
                self._deliver(action.frame, action.streams)
            elif isinstance(action, Subscribe):
                # Sharded Pub/Sub: one call names channels of one slot (one partition).
                self._send_to(action.partition, "SSUBSCRIBE", *action.keys)
            elif isinstance(action, Unsubscribe):
                self._send_to(action.partition, "SUNSUBSCRIBE", *action.keys)
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
        action.stream.writer.end(action.frame)  # a no-op if it never had one (records.UNATTACHED)
        metrics.CLIENTS.set(self.clients)

    def _read_gap(self, action: ReadGap) -> None:
        """Dispatch, from history, what was published while the hub was away, page by page."""
        gap: ReadGap | None = action
        while gap is not None:
            replay = self._history.page(
                gap.partition,
                gap.channels,
                after=gap.after,
                check=False,
                most=PAGE_EVENTS,
                budget=GAP_BYTES,
            )
            actions = self.core.gap_read(gap.partition, replay)
            gap = next((a for a in actions if isinstance(a, ReadGap)), None)
            self._do([a for a in actions if not isinstance(a, ReadGap)])

    # -- the clock ----------------------------------------------------------

    def _clock(self) -> None:
        """Heartbeats for idle live streams every interval; token expiry on time;
        presence (streams per channel) written when it changed, within a second."""
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
            if not self.core.stopping:
                self.presence.sync(self.core.stream_counts())

    # -- the Pub/Sub links ------------------------------------------------------

    def _plan(self, refresh: bool) -> None:
        """Put each partition on the link to the node that owns it, creating
        links as needed; a partition that moved is lost on its old link and
        brought up on its new one (resubscribed, its gap read from history)."""
        try:
            owners = self._topology.owners(refresh=refresh)
        except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            log.warning("cannot read the cluster's topology (%s); retrying", exc)
            return
        for number, address in owners.items():
            current = self._owner.get(number)
            if current is not None and current.address == address:
                continue
            if current is not None:
                log.info("partition %d moved from %s:%d to %s:%d", number, *current.address, *address)
                current.drop(number)
            link = self._links.get(address)
            if link is None or link.closed:
                link = self._links[address] = Link(address, self._topology.pubsub_pool(address), self._wiring)
            self._owner[number] = link
            link.add(number)
        for address, link in list(self._links.items()):
            if not link.partitions:
                link.close()
                del self._links[address]

    def _replan_soon(self, settle: float = 0.0) -> None:
        """The topology changed (a failover, a slot moved): follow it, once at a time.

        With `settle`, Redis said a slot left a node (a dropped subscription, a
        MOVED) but the slot map read next may not show it yet (the cluster's
        gossip takes a moment): keep reading it, with backoff, until a partition
        moves or `settle` seconds pass, or that partition's events stay lost.
        """
        if settle:
            self._settle_until = max(self._settle_until, time.monotonic() + settle)
        if self._topology.clustered and (self._replanner is None or self._replanner.dead):
            self._replanner = gevent.spawn(self._replan)

    def _replan(self) -> None:
        backoff = 0.05
        while not self.core.stopping:
            before = {n: link.address for n, link in self._owner.items()}
            self._plan(refresh=True)
            after = {n: link.address for n, link in self._owner.items()}
            if after != before:
                self._settle_until = 0.0  # the move Redis told of is followed
            settled = time.monotonic() >= self._settle_until
            if settled and all(link.healthy for link in self._links.values()):
                return
            if after != before:
                backoff = 0.05
            gevent.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, 2.0)

    def _send_to(self, number: int, *args: Any) -> None:
        """Send a command on the link of partition `number`, if it is up for it."""
        link = self._owner.get(number)
        if link is not None and number in link.up:
            link.send_quietly(*args)

    def _yield_if_busy(self) -> None:
        """Let the event loop write queued bytes out during a burst of events.

        While Redis has more data buffered the reader never waits, so without
        this a burst would pile up in every writer's queue, and healthy clients
        would be cut as slow. Yielding per quarter buffer keeps the switches per event low.
        """
        if self._burst >= self._burst_limit:
            self._burst = 0
            gevent.sleep(0)
