"""The dispatcher process: takes its share of the lanes, runs their deliveries
(lanes.py) and sweeps (sweeper.py), and answers /healthz, /readyz and /metrics.

With no WEBHOOK_URL it does nothing but answer those (webhooks are off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
import redis
from gevent.pywsgi import WSGIServer
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.cluster import RedisCluster

from . import leases, metrics
from .config import Config
from .contract import group_name
from .lanes import READ_BLOCK_MS, Delivery
from .leases import Client, Lease
from .occupancy import LANES, lane_key
from .sender import Sender
from .sweeper import MOST, sweep

log = logging.getLogger("herald.dispatcher")

SWEEP_SECONDS = 1.0  # how often the holder of lane 0 sweeps its partition
TRIM_SECONDS = 30.0  # the lanes' cap bounds them meanwhile
RENEWALS = 6  # lease renewals per lease period


def make_client(config: Config, blocking: bool = False) -> Client:
    """Redis, or the cluster (REDIS_MODE). `blocking`: for the lanes' reads, which
    wait up to READ_BLOCK_MS for new entries, so their sockets wait that much longer."""
    timeout = config.redis_timeout_seconds + (READ_BLOCK_MS / 1000 if blocking else 0)
    connect = config.redis_timeout_seconds
    if config.redis_mode == "cluster":
        # Per node: each lane held waits on a connection of its own.
        return RedisCluster.from_url(
            config.redis_url, socket_timeout=timeout, socket_connect_timeout=connect, max_connections=1024
        )
    return redis.Redis.from_url(
        config.redis_url, socket_timeout=timeout, socket_connect_timeout=connect, max_connections=1024
    )


class Lane:
    """A lane this dispatcher holds: a Delivery per endpoint, its trimming, and
    (lane 0) its partition's sweep."""

    def __init__(self, dispatcher: Dispatcher, partition: int, number: int) -> None:
        self.partition, self.number = partition, number
        self._d = dispatcher
        self.lease = Lease(
            dispatcher.client, partition, number, dispatcher.me, dispatcher.config.lease_seconds
        )
        self.stop = gevent.event.Event()
        self.deliveries = [
            Delivery(
                (dispatcher.client, dispatcher.reader),
                dispatcher.sender,
                dispatcher.config,
                (partition, number),
                e,
                dispatcher.me,
                self.lease,
                self.stop,
            )
            for e in dispatcher.config.endpoints
        ]
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        self._greenlets = [gevent.spawn(d.run) for d in self.deliveries]
        self._greenlets.append(gevent.spawn(self._housekeeping))

    def halt(self, timeout: float) -> None:
        """Stop: deliveries waiting for new entries end at once; one with a POST
        in flight finishes it first (bounded by the request timeout)."""
        self.stop.set()
        for delivery, greenlet in zip(self.deliveries, self._greenlets, strict=False):
            if delivery.reading:
                greenlet.kill(block=False)
        gevent.joinall(self._greenlets, timeout=timeout)
        gevent.killall([g for g in self._greenlets if not g.dead], block=True, timeout=1)

    def _housekeeping(self) -> None:
        """Lane 0 sweeps its partition every SWEEP_SECONDS; every lane trims every TRIM_SECONDS."""
        next_trim = time.monotonic() + TRIM_SECONDS
        while not self.stop.wait(SWEEP_SECONDS if self.number == 0 else TRIM_SECONDS):
            try:
                if self.number == 0:
                    self._sweep()
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + TRIM_SECONDS
                    self._trim()
            except (redis.RedisError, OSError) as exc:
                log.warning("partition %s: sweep or trim failed (%s); retrying", self.partition, exc)

    def _sweep(self) -> None:
        for _ in range(10):  # a bounded catch-up per tick
            looked, _written = sweep(self._d.client, self.partition, self._d.config.vacated_delay_seconds)
            if looked < MOST:
                return

    def _trim(self) -> None:
        """Drop the entries every endpoint's group is done with (below the
        lowest pending or last delivered id of any group on the lane)."""
        client, key = self._d.client, lane_key(self.partition, self.number)
        floor: tuple[int, int] | None = None
        for group in client.xinfo_groups(key):
            name = _text(group["name"])
            if group["pending"]:
                low = _text(client.xpending(key, name)["min"])
            else:
                low = _text(group["last-delivered-id"])
            value = _id(low)
            floor = value if floor is None or value < floor else floor
        if floor is not None:
            client.xtrim(key, minid=f"{floor[0]}-{floor[1]}", approximate=True)


class Dispatcher:
    """The process: the lane coordinator, and the health and metrics server."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # Neither connects before it is used: with webhooks off, nothing is.
        self.client: Client = make_client(config)
        self.reader: Client = make_client(config, blocking=True)
        self.sender = Sender(config)
        self.lanes: dict[tuple[int, int], Lane] = {}
        self.stopping = gevent.event.Event()
        metrics.watch_oldest(self._heads)

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT; then stop cleanly, giving the lanes up."""
        server = WSGIServer(("0.0.0.0", self.config.port), self.wsgi, log=None, error_log=log)
        server.start()
        if not self.config.enabled:
            log.info("webhooks are off (no WEBHOOK_URL): the dispatcher idles")
        else:
            log.info(
                "dispatching webhooks to %s (groups %s)",
                ", ".join(e.shown for e in self.config.endpoints),
                ", ".join(group_name(e.url) for e in self.config.endpoints),
            )
        try:
            while not self.stopping.is_set():
                if self.config.enabled:
                    self.coordinate()
                self.stopping.wait(self.config.lease_seconds / RENEWALS)
        finally:
            if self.config.enabled:
                self.leave()
            server.stop(timeout=1)

    def coordinate(self) -> None:
        """One round: say this dispatcher is alive, renew what it holds, give up
        lanes beyond its share, take free ones up to it."""
        try:
            live = leases.register(self.client, self.me, self.config.lease_seconds)
            held: dict[int, list[Lease]] = {}
            for (partition, _), lane in self.lanes.items():
                held.setdefault(partition, []).append(lane.lease)
            leases.renew_all(self.client, self.me, self.config.lease_seconds, held)
            for where, lane in list(self.lanes.items()):
                if lane.lease.remaining() <= 0:
                    log.warning("lane %s/%s: lease lost; stopping it", *where)
                    self._drop(where, release=False)
            all_lanes = [(p, n) for p in range(self.config.partitions) for n in range(LANES)]
            fair = leases.share(len(all_lanes), live)
            while len(self.lanes) > fair:
                self._drop(next(iter(self.lanes)), release=True)
            if len(self.lanes) < fair:
                self._take(all_lanes, fair)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot coordinate lanes (%s); retrying", exc)
        metrics.LANES.set(len(self.lanes))

    def _take(self, all_lanes: list[tuple[int, int]], fair: int) -> None:
        # A different order per dispatcher, so two starting together do not race for the same lanes.
        start = random.randrange(len(all_lanes))
        for where in all_lanes[start:] + all_lanes[:start]:
            if len(self.lanes) >= fair:
                return
            if where in self.lanes:
                continue
            lane = Lane(self, *where)
            if lane.lease.acquire():
                log.info("lane %s/%s: taken", *where)
                self.lanes[where] = lane
                lane.start()

    def _drop(self, where: tuple[int, int], release: bool) -> None:
        lane = self.lanes.pop(where)
        lane.halt(self.config.timeout_seconds + 1)
        if release:
            lane.lease.release()
            log.info("lane %s/%s: given up", *where)

    def leave(self) -> None:
        """A clean stop: off the registry first (so the others' share grows), then
        every lane halted at once and released, for the others to take at once."""
        with contextlib.suppress(redis.RedisError, OSError):
            leases.register(self.client, self.me, 0)
        lanes = list(self.lanes.values())
        self.lanes.clear()
        for lane in lanes:
            lane.stop.set()
        gevent.joinall([gevent.spawn(lane.halt, self.config.timeout_seconds + 1) for lane in lanes])
        for lane in lanes:
            # On a Redis error the lease lapses on its own.
            with contextlib.suppress(redis.RedisError, OSError):
                lane.lease.release()
        log.info("stopped: %d lane(s) given up", len(lanes))

    def _heads(self) -> Iterable[int | None]:
        return [d.head_ms for lane in list(self.lanes.values()) for d in lane.deliveries]

    # -- HTTP: health and metrics -------------------------------------------

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [generate_latest(metrics.REGISTRY)]
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            return self._ready(start_response)
        return _json(start_response, "404 Not Found", {"error": "not_found", "message": "no such path"})

    def _ready(self, start_response: Callable[..., Any]) -> list[bytes]:
        if not self.config.enabled:
            return _json(start_response, "200 OK", {"status": "ok", "webhooks": "off"})
        try:
            self.client.ping()
        except (redis.RedisError, OSError):
            return _json(
                start_response,
                "503 Service Unavailable",
                {"error": "redis_unavailable", "message": "Redis does not answer"},
            )
        return _json(start_response, "200 OK", {"status": "ok", "webhooks": "on", "lanes": len(self.lanes)})


def _json(start_response: Callable[..., Any], status: str, value: object) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(value).encode()]


def _id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
