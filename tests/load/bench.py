"""Herald's load tool: `make bench` or `python -m tests.load.bench [--mode compose|direct] [--quick]...`.

Compose mode (the default) measures the stack users run: it brings up
compose.yaml under its own project name (tests.load.compose) and drives it
through nginx two ways, via Docker's userland proxy on the published port and
from inside nginx's network namespace, with CPU per container from cgroup
accounting. Direct mode starts its own processes on loopback (Redis from a
local Docker image or REDIS_URL, the publisher, ONE stream worker, nginx;
tests.load.stack) and measures the stream worker alone, directly and through
nginx. Both run the same bounded scenarios (Bench, over a BenchStack), print a
table of figures next to the targets (tests.load.report), and write everything
to bench-results/<timestamp>.json. Correctness (every subscriber got every
event exactly once, in order) decides the exit code; speed never does, unless
--fail-on-miss is given. See docs/benchmark.md.

--transport unix|tcp (default unix, as compose.yaml's STREAM_TRANSPORT): how
nginx reaches the stream worker, in either mode: over a Unix socket on a
shared volume (direct mode: in the temporary directory), or over TCP (the
former topology: stream-service:8000 across the compose network; the worker's
loopback port). One transport per run, recorded in the JSON ("transport", and
the stack's settings) and in the table's headline; for a before/after table,
run twice and print both with `--compare tcp.json unix.json`.

The nchan reference (tests.load.nchan): whenever the fan-out scenario runs, in
either mode, the same fan-out (same sizes, same client processes, same
checks) also runs on nginx + nchan with one worker, on loopback, right after
Herald's fan-out rows (same minutes), unless --no-reference (= --reference
none). Its row joins the table, Herald's fan-out rows are printed as
multiples of it (CPU per delivery, p99), and compose mode judges the netns
path against it (tests.load.report: REF_*). nchan on the bench's Redis in
direct mode, on a Redis of its own in compose mode (Herald's stack stays up,
idle, meanwhile: its health checks show under "others"). A run that asks for the
reference checks first that nchan is there (or installs it as root) and
otherwise stops at once, saying what to install.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.load.client import ClientPool, HttpConnection
from tests.load.compose import start_compose
from tests.load.nchan import NchanStack, ensure_nchan, parse_status, start_nchan
from tests.load.perf import PerfRecording, breakdown, find_perf, format_breakdown
from tests.load.profile import Recording, find_py_spy
from tests.load.report import (
    comparison_rows,
    compose_rows,
    delivery_items,
    evaluate,
    evaluate_compose,
    format_table,
    reference_rows,
    rows,
)
from tests.load.stack import (
    TRANSPORTS,
    BenchStack,
    Route,
    cpu_seconds,
    machine_busy_seconds,
    raise_nofile,
    start_stack,
)
from tests.support.services import ROOT

SCENARIOS = ("idle", "fanout", "publish", "many-channels", "scaling")
COMPOSE_SCENARIOS = ("idle", "fanout", "publish")
COMPOSE_PATHS = ("proxy", "netns")


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; the defaults are the issue's sizes."""

    idle_connections: int = 5000
    idle_channels: int = 100
    idle_seconds: float = 16.0  # over one heartbeat (HEARTBEAT_SECONDS=15)
    fanout_subscribers: int = 1000
    fanout_events: int = 200
    fanout_rate: float = 50.0
    publish_count: int = 10000
    publish_concurrency: int = 50
    batch_size: int = 100
    batch_events: int = 50000
    batch_concurrency: int = 8
    channels: int = 2000
    channel_events: int = 20
    channel_rate: float = 4000.0  # events/s over all channels
    scaling: tuple[int, ...] = (1000, 2000, 4000)


QUICK = Sizes(
    idle_connections=50,
    idle_channels=5,
    idle_seconds=1.0,
    fanout_subscribers=50,
    fanout_events=20,
    publish_count=200,
    publish_concurrency=10,
    batch_events=1000,
    batch_concurrency=4,
    channels=50,
    channel_events=5,
    channel_rate=1000.0,
    scaling=(50, 100, 200),
)


def stored_total(client: redis.Redis) -> int:
    """Events stored so far: the sum of every partition's sequence (docs/redis-contract.md)."""
    return sum(int(client.hget(key, "seq") or 0) for key in client.scan_iter("herald:{p*}:meta", count=1000))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max, in milliseconds (nearest rank)."""
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return 1000 * ordered[min(n - 1, max(0, int(p * n + 0.999999) - 1))]

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": 1000 * ordered[-1], "n": n}


def others_share(busy: float, ours: float, seconds: float) -> float:
    """The share of the machine's CPUs that processes other than the bench's and the stack's used."""
    return max(0.0, busy - ours) / max(seconds * (os.cpu_count() or 1), 1e-9)


def by_tenth(latencies: Sequence[float], indexes: Sequence[int], events: int) -> list[dict[str, float]]:
    """Latency percentiles of the first tenth of the events, the second...: does a backlog grow?"""
    tenths: list[list[float]] = [[] for _ in range(10)]
    for latency, index in zip(latencies, indexes, strict=True):
        tenths[min(9, index * 10 // max(events, 1))].append(latency)
    return [percentiles(t) for t in tenths if t]


@dataclass(frozen=True)
class Usage:
    """CPU seconds used so far by component (the stack's, "clients", "bench") and by the whole machine."""

    cpu: dict[str, float]
    busy: float
    wall: float

    def since(self, before: Usage) -> tuple[dict[str, float], float]:
        """CPU seconds used by component since `before`, and the share of the machine others used."""
        spent = {name: value - before.cpu.get(name, 0.0) for name, value in self.cpu.items()}
        others = others_share(self.busy - before.busy, sum(spent.values()), self.wall - before.wall)
        return spent, others


def cpu_figures(spent: dict[str, float], count: int, unit: str, counted: tuple[str, ...]) -> dict[str, Any]:
    """CPU per unit of work in µs by component, and summed over the components a target counts."""
    per = {name: 1e6 * value / max(count, 1) for name, value in spent.items()}
    return {
        "cpu_s": spent,
        f"cpu_us_per_{unit}": per,
        f"server_cpu_us_per_{unit}": sum(per[name] for name in counted),
        "counted": list(counted),
    }


class ScenarioFailed(Exception):
    pass


class Bench:
    """The scenarios, run against any stack (BenchStack) on the routes it offers."""

    dialect = "herald"  # how the client processes read the streams (tests.load.client)
    # --perf: where `perf record -a` of each fan-out goes (tests.load.perf); None = not recorded.
    perf_dir: Path | None = None

    def __init__(
        self,
        stack: BenchStack,
        pool: ClientPool,
        sizes: Sizes,
        profile_dir: Path | None,
        native: bool = False,
    ) -> None:
        self.native = native
        self.stack = stack
        self.pool = pool
        self.sizes = sizes
        self.run_id = secrets.token_hex(3)
        self.profile_dir = profile_dir
        host, port = stack.stats
        self.stats_conn = HttpConnection(port, host=host)
        # What a scenario started beside the stack (the nchan reference) and has not stopped
        # yet: stopped by main() too, should the run end in the middle (Ctrl-C, SIGTERM).
        self.cleanups: list[Callable[[], None]] = []

    # -- helpers -------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        status, body = await self.stats_conn.get("/stats")
        if status != 200:
            raise ScenarioFailed(f"/stats answered {status}")
        return dict(json.loads(body))

    async def wait_clients(self, count: int, timeout: float = 30) -> int:
        """Wait until the stream worker counts `count` clients; the last count seen."""
        deadline = time.monotonic() + timeout
        clients = -1
        while time.monotonic() < deadline:
            clients = int((await self.stats())["clients"])
            if clients == count:
                return clients
            await asyncio.sleep(0.1)
        return clients

    async def open_streams(self, route: Route, paths: list[str]) -> dict[str, Any]:
        """Open the streams over the client processes; wait until each is live (or failed)."""
        count = len(self.pool.pipes)
        shares = [paths[i::count] for i in range(count)]
        timeout = 30 + len(paths) / 250
        command = {"op": "open", "address": route.stream, "netns": route.netns, "dialect": self.dialect}
        answers = await self.pool.call(
            [{**command, "paths": share, "concurrency": 100, "timeout": timeout} for share in shares],
            timeout + 10,
        )
        failures: Counter[str] = Counter()
        for answer in answers:
            failures.update(answer["failures"])
        live = sum(int(a["live"]) for a in answers)
        return {
            "requested": len(paths),
            "live": live,
            "failures": dict(failures),
            "open_seconds": max(float(a["seconds"]) for a in answers),
        }

    def counters(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
        """What the server counted during a delivery run (from two /stats readings)."""
        return {
            "hub_delivered": int(after["delivered"]) - int(before["delivered"]),
            "dropped_slow": int(after["dropped_slow"]) - int(before["dropped_slow"]),
        }

    async def close_streams(self) -> int:
        await self.pool.broadcast({"op": "close", "timeout": 10}, 30)
        return await self.wait_clients(0)

    def usage(self) -> Usage:
        cpu = self.stack.cpu()
        cpu["clients"] = cpu_seconds(self.pool.pids)
        cpu["bench"] = cpu_seconds([os.getpid()])
        return Usage(cpu, machine_busy_seconds(), time.time())

    async def profile(self, name: str | None, service: str, seconds: float) -> Recording | None:
        """Start py-spy on the service's first worker when --profile was given."""
        binary = find_py_spy()
        pids = self.stack.worker_pids(service)
        if name is None or self.profile_dir is None or not binary or not pids:
            return None
        out = self.profile_dir / f"{name}.txt"
        recording = Recording(binary, pids[0], seconds, out, native=self.native)
        await asyncio.sleep(0.5)  # py-spy attaches
        return recording

    def record_perf(self, name: str | None, seconds: float) -> PerfRecording | None:
        """Start `perf record -a` for the publishing window when --perf was given."""
        binary = find_perf()
        if self.perf_dir is None or binary is None:
            return None
        label = name or "fanout"
        label = label if self.dialect == "herald" else f"{self.dialect}-{label}"
        return PerfRecording(binary, seconds, self.perf_dir / f"{label}.data")

    def component_pids(self) -> dict[str, list[int]]:
        """Host pids by component, as the stack counts its CPU, plus the bench's own."""
        stack: Any = self.stack
        if hasattr(stack, "containers"):  # compose mode: each container's cgroup
            found = {name: c.cgroup.pids() for name, c in stack.containers.items()}
            found["docker-proxy"] = list(getattr(stack, "proxies", []))
        elif hasattr(stack, "nginx_pids"):  # the nchan reference
            found = {"nginx": stack.nginx_pids(), "redis": stack.redis.pids()}
        else:  # direct mode
            found = {name: list(pids) for name, pids in stack.pids.items()}
        found["clients"] = list(self.pool.pids)
        found["bench"] = [os.getpid()]
        return found

    def perf_breakdown(self, perf: PerfRecording, deliveries: int) -> dict[str, Any]:
        """µs per delivery by component and kind (tests.load.perf), from the recording."""
        failed = perf.finish()
        if failed:
            return {"error": failed}
        components = self.component_pids()
        table = breakdown(perf.samples(), components, deliveries)
        log(f"  perf ({perf.out}):\n{format_breakdown(table)}")
        return {"file": str(perf.out), "us_per_delivery": table, "pids": components}

    async def publish_paced(
        self,
        route: Route,
        count: int,
        rate: float,
        body: Callable[[int], bytes],
        path: str = "/publish",
        accepted: tuple[int, ...] = (202,),
    ) -> dict[str, Any]:
        """Publish `count` requests one after another on one connection, `rate` per second.

        Each POST to `path` must answer one of the `accepted` statuses.
        """
        host, port = route.publish
        conn = HttpConnection(port, host=host, netns=route.netns)
        loop = asyncio.get_running_loop()
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        late = 0
        started = loop.time()
        try:
            for i in range(count):
                delay = started + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.005:
                    late += 1
                t = time.perf_counter()
                status, answer = await conn.post(path, body(i))
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1
                if status not in accepted:
                    raise ScenarioFailed(f"publish {i} answered {status}: {answer[:200]!r}")
        finally:
            conn.close()
        return {
            "requests": count,
            "seconds": loop.time() - started,
            "statuses": dict(statuses),
            "latency_ms": percentiles(latencies),
            "sent_late": late,
        }

    async def open_all(self, name: str, route: Route, paths: list[str]) -> dict[str, Any]:
        """Open the streams and check that the stream worker holds every one of them."""
        opened = await self.open_streams(route, paths)
        if opened["live"] != len(paths):
            await self.close_streams()
            raise ScenarioFailed(f"{name}: only {opened['live']} of {len(paths)} streams opened: {opened}")
        seen = await self.wait_clients(len(paths))
        if seen != len(paths):
            await self.close_streams()
            raise ScenarioFailed(f"{name}: the stream worker counts {seen} clients, expected {len(paths)}")
        return opened

    async def deliver(
        self,
        *,
        name: str,
        route: Route,
        paths: list[str],
        events_each: int,
        publish: Callable[[], Awaitable[Any]],
        publish_seconds: float,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """Open streams, publish, collect: delivery, latency and CPU figures."""
        opened = await self.open_all(name, route, paths)
        await self.pool.broadcast({"op": "expect", "count": events_each}, 30)
        recording = await self.profile(profile, "stream", publish_seconds + 1)
        perf = self.record_perf(profile, publish_seconds + 1)
        stats0 = await self.stats()
        before = self.usage()
        published = await publish()
        # A worker that falls behind still delivers everything, late: wait for it, within bounds.
        patience = 20 + publish_seconds + len(paths) * events_each / 10000
        answers = await self.pool.broadcast({"op": "collect", "timeout": patience}, patience + 30)
        after = self.usage()
        stats1 = await self.stats()
        profile_summary = recording.finish() if recording else None
        closed = await self.close_streams()
        result = delivery_figures(answers, len(paths), events_each, before, after, self.stack)
        if perf is not None:
            result["perf"] = self.perf_breakdown(perf, int(result["received"]))
        result.update(
            self.counters(stats0, stats1),
            open=opened,
            publish=published,
            clients_after_close=closed,
        )
        if profile_summary is not None:
            result["profile"] = profile_summary
        return result

    # -- scenarios -------------------------------------------------------------

    async def idle(self, route: Route, requested: int) -> dict[str, Any]:
        """Memory and CPU of `requested` idle streams on one route (fewer if the route cannot hold them)."""
        s = self.sizes
        limit = self.stack.stream_limit(route)
        connections = min(requested, limit[0]) if limit else requested
        channels = [
            f"bench.{self.run_id}.idle.{route.name}.{i % s.idle_channels}" for i in range(connections)
        ]
        paths = [f"/stream?channel={c}" for c in channels]
        # Warm up the code paths (first request, first subscription) before the baseline.
        warm = await self.open_streams(route, paths[:20])
        await self.close_streams()
        await asyncio.sleep(0.5)
        rss0 = self.stack.rss_kb()
        opened = await self.open_streams(route, paths)
        held = await self.wait_clients(opened["live"])
        await asyncio.sleep(1)
        rss1 = self.stack.rss_kb()
        workers = self.stack.worker_pids("stream")
        before, worker0 = self.usage(), cpu_seconds(workers)
        await asyncio.sleep(s.idle_seconds)
        after, worker1 = self.usage(), cpu_seconds(workers)
        rss2 = self.stack.rss_kb()
        stats = await self.stats()
        closed = await self.close_streams()
        live = int(opened["live"])
        return {
            "connections": connections,
            "requested_connections": requested,
            "capped_by": limit[1] if limit and connections < requested else None,
            "channels": min(s.idle_channels, connections),
            "live": live,
            "held_by_worker": held,
            "complete": live == connections and held == connections,
            "failures": opened["failures"],
            "open_seconds": opened["open_seconds"],
            **idle_figures(self.stack, live, (rss0, rss1, rss2), before, after),
            # The stream worker alone: heartbeats, without the container's healthchecks.
            "stream_worker_cpu_percent": 100 * (worker1 - worker0) / max(after.wall - before.wall, 1e-9),
            "heartbeat_seconds": self.stack.heartbeat_seconds,
            "hub_channels": stats["channels"],
            "warmup": warm["live"],
            "clients_after_close": closed,
        }

    async def fanout(self, route: Route, subscribers: int, profile: str | None = None) -> dict[str, Any]:
        s = self.sizes
        channel = f"bench.{self.run_id}.fan.{route.name}.{subscribers}"

        def body(i: int) -> bytes:
            return json.dumps({"channel": channel, "data": [i, time.time()]}).encode()

        async def publish() -> Any:
            return await self.publish_paced(route, s.fanout_events, s.fanout_rate, body)

        result = await self.deliver(
            name=f"fanout {route.name} {subscribers}",
            route=route,
            paths=[f"/stream?channel={channel}"] * subscribers,
            events_each=s.fanout_events,
            publish=publish,
            publish_seconds=s.fanout_events / s.fanout_rate,
            profile=profile,
        )
        result["rate_events_per_s"] = s.fanout_rate
        return result

    async def many_channels(self, route: Route) -> dict[str, Any]:
        s = self.sizes
        channels = [f"bench.{self.run_id}.ch.{i}" for i in range(s.channels)]
        blocks = [channels[i : i + s.batch_size] for i in range(0, len(channels), s.batch_size)]
        requests = s.channel_events * len(blocks)
        rate = s.channel_rate / s.batch_size  # requests per second

        def body(i: int) -> bytes:
            index, block = divmod(i, len(blocks))
            now = time.time()
            return json.dumps([{"channel": c, "data": [index, now]} for c in blocks[block]]).encode()

        async def publish() -> Any:
            return await self.publish_paced(route, requests, rate, body)

        result = await self.deliver(
            name="many-channels",
            route=route,
            paths=[f"/stream?channel={c}" for c in channels],
            events_each=s.channel_events,
            publish=publish,
            publish_seconds=requests / rate,
        )
        result["rate_events_per_s"] = s.channel_rate
        result["batch_size"] = s.batch_size
        return result

    def publish_bodies(self, route: Route, requests: int, batch: int) -> list[bytes]:
        channel = f"bench.{self.run_id}.pub.{route.name}"
        if batch == 1:
            return [json.dumps({"channel": channel, "data": i}).encode() for i in range(requests)]
        return [
            json.dumps([{"channel": channel, "data": r * batch + j} for j in range(batch)]).encode()
            for r in range(requests)
        ]

    async def publish_load(
        self, route: Route, *, total_events: int, batch: int, concurrency: int
    ) -> dict[str, Any]:
        """POST as fast as the service answers, `concurrency` requests in flight, no subscribers."""
        requests = total_events // batch
        bodies = self.publish_bodies(route, requests, batch)
        counter = itertools.count()
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        host, port = route.publish
        conns = [HttpConnection(port, host=host, netns=route.netns) for _ in range(concurrency)]

        async def runner(conn: HttpConnection) -> None:
            while (i := next(counter)) < requests:
                t = time.perf_counter()
                status, _ = await conn.post("/publish", bodies[i])
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1

        recording = await self.profile(f"publish-{route.name}-batch{batch}", "publisher", 120)
        client = redis.Redis.from_url(self.stack.redis_url)
        try:
            seq0 = stored_total(client)
            before = self.usage()
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(asyncio.gather(*(runner(c) for c in conns)), 60 + requests / 100)
            finally:
                for conn in conns:
                    conn.close()
            elapsed = time.perf_counter() - t0
            after = self.usage()
            seq1 = stored_total(client)
        finally:
            client.close()
        accepted = statuses.get(202, 0)
        stored = seq1 - seq0
        extra = {"profile": recording.finish(now=True)} if recording else {}
        return {
            **extra,
            "requests": requests,
            "batch": batch,
            "events": requests * batch,
            "concurrency": concurrency,
            "statuses": {str(k): v for k, v in statuses.items()},
            "stored_events": stored,
            "complete": accepted == requests and stored >= requests * batch,
            "seconds": elapsed,
            "requests_per_s": requests / elapsed,
            "events_per_s": requests * batch / elapsed,
            "latency_ms": percentiles(latencies),
            **publish_figures(before, after, requests, batch, self.stack),
            "connections_opened": sum(c.connects for c in conns),
        }

    async def publish(self, route: Route) -> dict[str, Any]:
        s = self.sizes
        single = await self.publish_load(
            route, total_events=s.publish_count, batch=1, concurrency=s.publish_concurrency
        )
        batched = await self.publish_load(
            route, total_events=s.batch_events, batch=s.batch_size, concurrency=s.batch_concurrency
        )
        return {"single": single, "batched": batched, "complete": single["complete"] and batched["complete"]}

    def cleanup_redis(self) -> None:
        """Remove this run's channels from Redis (matters when REDIS_URL is someone's Redis)."""
        client = redis.Redis.from_url(self.stack.redis_url)
        try:
            prefix = f"bench.{self.run_id}."
            pattern = f"herald:{{p*}}:stream:{prefix}*"
            keys = list(itertools.islice(client.scan_iter(pattern, count=1000), 100000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
            by_tag: dict[str, list[str]] = {}
            for key in keys:
                tag, _, channel = key.decode().partition(":stream:")
                by_tag.setdefault(tag, []).append(channel)
            for tag, fields in by_tag.items():
                for i in range(0, len(fields), 1000):
                    client.hdel(f"{tag}:channels", *fields[i : i + 1000])
                    client.zrem(f"{tag}:expiries", *fields[i : i + 1000])
        finally:
            client.close()


class NchanBench(Bench):
    """The fan-out scenario against the nchan reference (tests.load.nchan), with the same clients.

    Only what differs from Herald: nchan's channel URLs and answers (201/202),
    its status page instead of /stats, its EventSource dialect in the clients.
    """

    dialect = "nchan"

    def __init__(self, stack: NchanStack, pool: ClientPool, sizes: Sizes) -> None:
        super().__init__(stack, pool, sizes, None)
        self.nchan = stack

    async def stats(self) -> dict[str, Any]:
        status, body = await self.stats_conn.get("/nchan_status")
        if status != 200:
            raise ScenarioFailed(f"/nchan_status answered {status}")
        found = parse_status(body.decode(errors="replace"))
        self.nchan.status = found
        return {
            "clients": int(found.get("subscribers", -1)),
            "published": int(found.get("total published messages", 0)),
        }

    def counters(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
        return {"nchan_published": int(after["published"]) - int(before["published"])}

    async def open_all(self, name: str, route: Route, paths: list[str]) -> dict[str, Any]:
        """Open the streams, then wait until nchan has subscribed to their channel in Redis.

        nchan answers a subscriber (`: hi`) before its worker's SUBSCRIBE to the
        channel's Redis pub/sub channel has gone through; a message published in
        between does not reach it (with `newest`). A Herald stream is live only
        once subscribed, so nchan gets the same head start.
        """
        opened = await super().open_all(name, route, paths)
        channels = {path.removeprefix("/sub/") for path in paths}
        keys = [f"{self.nchan.namespace}:{{channel:/{c}}}:pubsub" for c in channels]
        client = redis.Redis.from_url(self.nchan.redis_url)
        try:
            deadline = time.monotonic() + 10
            while True:
                counts = await asyncio.to_thread(client.pubsub_numsub, *keys)
                if all(int(n) >= 1 for _, n in counts):
                    break
                if time.monotonic() > deadline:
                    await self.close_streams()
                    raise ScenarioFailed(f"{name}: nchan did not subscribe in Redis within 10 s: {counts}")
                await asyncio.sleep(0.05)
        finally:
            client.close()
        return opened

    async def fanout(self, route: Route, subscribers: int, profile: str | None = None) -> dict[str, Any]:
        s = self.sizes
        channel = f"bench.{self.run_id}.fan.nchan.{subscribers}"

        def body(i: int) -> bytes:
            # What Herald's publisher stores and sends: [index, publish time], compact JSON.
            return json.dumps([i, time.time()], separators=(",", ":")).encode()

        async def publish() -> Any:
            return await self.publish_paced(
                route, s.fanout_events, s.fanout_rate, body, path=f"/pub/{channel}", accepted=(201, 202)
            )

        result = await self.deliver(
            name=f"fanout nchan {subscribers}",
            route=route,
            paths=[f"/sub/{channel}"] * subscribers,
            events_each=s.fanout_events,
            publish=publish,
            publish_seconds=s.fanout_events / s.fanout_rate,
        )
        result["rate_events_per_s"] = s.fanout_rate
        return result

    def cleanup_redis(self) -> None:
        self.nchan.cleanup_redis()


async def nchan_fanout(bench: Bench, tmp: Path, *, fsync: str, nofile: int) -> dict[str, Any]:
    """Herald's fan-out scenario on the nchan reference, with the same clients and sizes.

    On the bench's Redis in direct mode, on a Redis of its own in compose mode
    (whose Redis is inside the Compose network). Started here, stopped here.
    """
    redis_url = bench.stack.redis_url if bench.stack.mode == "direct" else None
    namespace = f"herald-bench-nchan-{bench.run_id}"
    try:
        stack = await asyncio.to_thread(
            start_nchan, tmp, redis_url=redis_url, fsync=fsync, nofile=nofile, namespace=namespace
        )
    except RuntimeError as exc:
        raise ScenarioFailed(f"the nchan reference did not start: {exc}") from exc
    bench.cleanups.append(stack.stop)
    reference = NchanBench(stack, bench.pool, bench.sizes)
    try:
        await reference.stats()  # nchan's version, for describe()
        result = await reference.fanout(stack.route, bench.sizes.fanout_subscribers)
        problem = stack.check()
        if problem:
            raise ScenarioFailed(problem)
        result["reference"] = stack.describe()
        result["via"] = stack.route.via
        result["headline"] = stack.headline()
        return result
    finally:
        reference.stats_conn.close()
        with contextlib.suppress(Exception):
            reference.cleanup_redis()
        await asyncio.to_thread(stack.stop)
        bench.cleanups.remove(stack.stop)


# -- figures from the measurements ---------------------------------------------------


def delivery_figures(
    answers: list[dict[str, Any]],
    streams: int,
    events_each: int,
    before: Usage,
    after: Usage,
    stack: BenchStack,
) -> dict[str, Any]:
    """Completeness, latency, rate and CPU of one delivery run, from the client processes' answers."""
    latencies: array[float] = array("d")
    indexes: array[int] = array("i")
    for answer in answers:
        latencies.frombytes(answer["latencies"])
        indexes.frombytes(answer["indexes"])
    received = sum(int(a["received"]) for a in answers)
    expected = streams * events_each
    complete = sum(int(a["complete"]) for a in answers)
    last = max((float(a["last_event_at"]) for a in answers), default=0.0) or after.wall
    span = max(last - before.wall, 1e-9)
    spent, others = after.since(before)
    # The stream worker's figures (Herald's stacks; the nchan reference has none).
    stream = (
        {
            "stream_cpu_s": spent["stream"],
            "stream_cpu_us_per_delivery": 1e6 * spent["stream"] / max(received, 1),
            "stream_cpu_share": spent["stream"] / span,
        }
        if "stream" in spent
        else {}
    )
    counted = stack.counted("delivery")
    return {
        "streams": streams,
        "events_each": events_each,
        "expected_deliveries": expected,
        "received": received,
        "complete_streams": complete,
        "events_per_read": received / max(sum(int(a["reads"]) for a in answers), 1),
        "errors": sum(int(a["errors"]) for a in answers),
        "closed_early": sum(int(a["closed_early"]) for a in answers),
        "complete": complete == streams and received == expected,
        "latency_ms": percentiles(latencies),
        "latency_ms_by_tenth": by_tenth(latencies, indexes, events_each),
        "seconds": span,
        "deliveries_per_s": received / span,
        **stream,
        **{f"{name}_cpu_s": spent[name] for name in ("nginx", "redis", "publisher") if name in spent},
        "client_cpu_s": spent["clients"],
        "server_cpu_share": sum(spent[name] for name in counted) / span,
        "others_cpu_share": others,
        "client_cpu_us_per_delivery": 1e6 * spent["clients"] / max(received, 1),
        **cpu_figures(spent, received, "delivery", counted),
    }


def publish_figures(
    before: Usage, after: Usage, requests: int, batch: int, stack: BenchStack
) -> dict[str, Any]:
    """CPU per publish and per event, by component and summed over what the target counts."""
    spent, others = after.since(before)
    events = requests * batch
    return {
        "publisher_cpu_s": spent["publisher"],
        "publisher_cpu_us_per_request": 1e6 * spent["publisher"] / max(requests, 1),
        "publisher_cpu_us_per_event": 1e6 * spent["publisher"] / max(events, 1),
        "nginx_cpu_s": spent["nginx"],
        "client_cpu_s": spent["bench"],
        "redis_cpu_s": spent["redis"],
        "redis_cpu_us_per_event": 1e6 * spent["redis"] / max(events, 1),
        "others_cpu_share": others,
        **cpu_figures(spent, requests, "request", stack.counted("publish")),
        "server_cpu_us_per_event": 1e6 * sum(spent[n] for n in stack.counted("publish")) / max(events, 1),
    }


def idle_figures(
    stack: BenchStack, live: int, rss: tuple[dict[str, int], ...], before: Usage, after: Usage
) -> dict[str, Any]:
    """Memory per idle stream (the larger of the two readings while open, minus the baseline) and idle CPU."""
    rss0, rss1, rss2 = rss
    per = {name: (max(rss1[name], rss2[name]) - rss0[name]) / max(live, 1) for name in rss0}
    counted = stack.counted("idle")
    spent, _ = after.since(before)
    seconds = max(after.wall - before.wall, 1e-9)
    percent = {name: 100 * value / seconds for name, value in spent.items()}
    total = sum(spent[name] for name in counted)
    return {
        "rss_kb_before": rss0,
        "rss_kb_open": rss1,
        "rss_kb_after_idle": rss2,
        "rss_kb_per_connection": sum(per[name] for name in counted),
        "rss_kb_per_connection_by": per,
        "idle_seconds": seconds,
        "idle_cpu_s": total,
        "idle_cpu_percent": 100 * total / seconds,
        "idle_cpu_percent_by": percent,
        "idle_cpu_us_per_connection_second": 1e6 * total / max(live, 1) / seconds,
        "counted": list(counted),
    }


# -- main ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.load.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode",
        choices=("compose", "direct"),
        default="compose",
        help="compose: the Compose stack users run (default); direct: gunicorn and nginx on loopback",
    )
    parser.add_argument(
        "--path",
        action="append",
        choices=COMPOSE_PATHS,
        help="compose mode: measure only via docker-proxy or only inside nginx's netns (default both)",
    )
    parser.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="unix",
        help="STREAM_TRANSPORT: nginx reaches the stream worker over a Unix socket (default) or TCP",
    )
    parser.add_argument(
        "--reference",
        choices=("nchan", "none"),
        help="run the fan-out scenario on nchan too, right after Herald's (default: nchan with fanout)",
    )
    parser.add_argument(
        "--no-reference", dest="reference", action="store_const", const="none", help="= --reference none"
    )
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only this (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the smoke test)")
    parser.add_argument("--idle-connections", type=int, help="idle streams (default 5,000; up to 20,000)")
    parser.add_argument("--idle-seconds", type=float, help="how long to measure idle CPU (default 16)")
    parser.add_argument("--subscribers", type=int, help="fan-out subscribers (default 1,000)")
    parser.add_argument("--scaling", help="comma-separated subscriber counts (default 1000,2000,4000)")
    parser.add_argument(
        "--json", type=Path, help="where to write the results (default bench-results/<time>.json)"
    )
    parser.add_argument("--client-processes", type=int, default=2, help="SSE client processes (default 2)")
    parser.add_argument(
        "--publisher-workers", type=int, default=2, help="direct mode: publisher WEB_CONCURRENCY (default 2)"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="direct mode: use this Redis (else Docker)"
    )
    parser.add_argument(
        "--redis-fsync",
        choices=("always", "everysec", "no"),
        default="always",
        help="appendfsync of the bench's Redis in direct mode and of the nchan reference's own Redis "
        "in compose mode (default always, as compose.yaml)",
    )
    parser.add_argument("--profile", type=Path, help="record py-spy profiles of the stream worker here")
    parser.add_argument(
        "--perf",
        type=Path,
        help="record `perf record -a` of each fan-out here and print µs per delivery by process and "
        "kernel work (tests.load.perf; needs linux-perf and root)",
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: include C frames (py-spy --native pauses the process: figures skew)",
    )
    parser.add_argument("--max-seconds", type=float, default=1800, help="hard limit for the whole run")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    parser.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only print the fan-out rows of earlier runs' results side by side (e.g. a --transport tcp "
        "run and a unix one), each against its own nchan reference; runs nothing",
    )
    args = parser.parse_args(argv)
    if args.idle_connections is not None and not 1 <= args.idle_connections <= 20000:
        parser.error("--idle-connections must be 1..20000")
    if args.mode == "compose" and set(args.scenario or ()) - set(COMPOSE_SCENARIOS):
        parser.error(f"compose mode runs {', '.join(COMPOSE_SCENARIOS)}; the others need --mode direct")
    if args.mode == "direct" and args.path:
        parser.error("--path is for compose mode (direct mode measures direct and through nginx)")
    if args.reference is None:
        args.reference = "nchan" if "fanout" in scenario_names(args) else "none"
    elif args.reference == "nchan" and "fanout" not in scenario_names(args):
        parser.error("--reference nchan runs the fan-out scenario: add --scenario fanout")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    changes: dict[str, Any] = {}
    if args.idle_connections is not None:
        changes["idle_connections"] = args.idle_connections
    if args.idle_seconds is not None:
        changes["idle_seconds"] = args.idle_seconds
    if args.subscribers is not None:
        changes["fanout_subscribers"] = args.subscribers
    if args.scaling:
        changes["scaling"] = tuple(int(x) for x in args.scaling.split(","))
    return dataclasses.replace(sizes, **changes)


def scenario_names(args: argparse.Namespace) -> list[str]:
    """The scenarios to run, in the bench's order."""
    wanted = set(args.scenario or (COMPOSE_SCENARIOS if args.mode == "compose" else SCENARIOS))
    return [name for name in SCENARIOS if name in wanted]


Step = tuple[str, str, Callable[[], Awaitable[Any]]]


def steps(bench: Bench, name: str) -> list[Step]:
    """(result key, label, measurement) of one scenario: one per route (scaling: per size)."""
    s = bench.sizes
    routes = bench.stack.routes(name)
    if name == "scaling":
        route = routes[0]
        return [
            (str(n), f"scaling/{n}", functools.partial(bench.fanout, route, n, profile=f"scaling-{n}"))
            for n in s.scaling
        ]
    if name == "many-channels":
        return [("", "many-channels", functools.partial(bench.many_channels, routes[0]))]
    found: list[Step] = []
    for route in routes:
        label = f"{name}/{route.name}"
        if name == "idle":
            found.append((route.name, label, functools.partial(bench.idle, route, s.idle_connections)))
        elif name == "fanout":
            fanout = functools.partial(
                bench.fanout, route, s.fanout_subscribers, profile=f"fanout-{route.name}"
            )
            found.append((route.name, label, fanout))
        else:
            found.append((route.name, label, functools.partial(bench.publish, route)))
    return found


async def run_scenarios(
    bench: Bench,
    names: list[str],
    log: Callable[[str], None],
    reference: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Every scenario on each of its routes; a failed one is recorded and the others still run.

    results[scenario][route or size], except many-channels (one route: its figures directly).
    `reference`: the nchan reference's fan-out, run right after Herald's (results["reference"]["nchan"]).
    """
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    async def attempt(label: str, step: Callable[[], Awaitable[Any]]) -> Any:
        log(f"  {label} ...")
        started = time.monotonic()
        try:
            value = await step()
        except (ScenarioFailed, TimeoutError, OSError, redis.RedisError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
            log(f"  {label}: FAILED {errors[label]}")
            with contextlib.suppress(Exception):
                await bench.close_streams()
            return None
        log(f"  {label}: done in {time.monotonic() - started:.1f} s")
        return value

    for name in names:
        results[name] = {}
        for key, label, step in steps(bench, name):
            value = await attempt(label, step)
            problem = bench.stack.check()
            if problem:
                errors[f"{label} (stack)"] = problem
                log(f"  {label}: {problem}")
            if value is not None and key:
                results[name][key] = value
            elif value is not None:
                results[name] = value
        if name == "fanout" and reference is not None:
            value = await attempt("fanout/nchan (reference)", reference)
            if value is not None:
                results["reference"] = {"nchan": value}
    results["errors"] = errors
    return results


def machine(load_average: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": load_average,
        "load_average_at_end": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def default_paths() -> tuple[str, ...]:
    """Both paths; only via docker-proxy when not root (entering nginx's netns needs root)."""
    if os.geteuid() == 0:
        return COMPOSE_PATHS
    log("bench: not root, so measuring via docker-proxy only (--path netns needs root)")
    return ("proxy",)


def start(args: argparse.Namespace, sizes: Sizes, tmp: Path, nofile: int) -> BenchStack:
    """The stack of the chosen mode, up and ready."""
    max_connections = max(10000, sizes.idle_connections + 500)
    if args.mode == "compose":
        paths = tuple(dict.fromkeys(args.path or default_paths()))
        return start_compose(tmp, max_connections=max_connections, paths=paths, transport=args.transport)
    return start_stack(
        tmp,
        redis_url=args.redis_url,
        publisher_workers=args.publisher_workers,
        max_connections=max_connections,
        nofile=nofile,
        redis_fsync=args.redis_fsync,
        transport=args.transport,
    )


def measure(
    args: argparse.Namespace, bench: Bench, names: list[str], tmp: Path, nofile: int
) -> dict[str, Any]:
    """Run the scenarios within --max-seconds; remove the run's keys from Redis afterwards."""
    reference = None
    if args.reference == "nchan":
        reference = functools.partial(nchan_fanout, bench, tmp, fsync=args.redis_fsync, nofile=nofile)

    async def run() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(run_scenarios(bench, names, log, reference), args.max_seconds)
        finally:
            bench.stats_conn.close()

    results = asyncio.run(run())
    with contextlib.suppress(Exception):
        bench.cleanup_redis()
    return results


def print_report(report: dict[str, Any], headline: str, out: Path) -> None:
    """The figures table, the targets table, failures and profiles."""
    results, mode = report["results"], report["stack"]["mode"]
    load = " ".join(f"{x:.2f}" for x in report["machine"]["load_average_at_start"])
    print(
        f"\nHerald bench {report['started']}: {os.cpu_count()} CPUs, load average at start {load}; {headline}"
    )
    print("paths: " + "; ".join(f"{name} = {r['via']}" for name, r in report["routes"].items()))
    nchan = results.get("reference", {}).get("nchan")
    if nchan:
        print(f"{nchan['headline']}; clients at {nchan['via']}")
    print()
    print(format_table(rows(results) if mode == "direct" else compose_rows(results)))
    print()
    versus = reference_rows(results, mode)
    if versus:
        print(f"stream transport {report['transport']}; Herald's fan-out as multiples of nchan's:")
        print(format_table(versus))
        print()
    table = [["target", "goal", "measured", ""]]
    print(
        format_table(table + [[t["name"], t["goal"], t["measured"], t["status"]] for t in report["targets"]])
    )
    for label, error in report["errors"].items():
        print(f"\nFAILED {label}: {error}")
    for label, r in _profiles(results):
        print(f"\nprofile during {label}:\n{r}")
    print(f"\nresults written to {out}")


def compare(files: list[Path]) -> int:
    """--compare: the fan-out rows of several results files in one table."""
    reports = []
    for path in files:
        try:
            reports.append((path.stem, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            print(f"bench: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    for name, report in reports:
        load = " ".join(f"{x:.2f}" for x in report["machine"]["load_average_at_start"])
        print(f"{name}: {report['started']}, load average at start {load}; {report['command']}")
    print()
    print(format_table(comparison_rows(reports)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    names = scenario_names(args)
    sizes = sizes_from(args)
    nofile = raise_nofile()
    needed = sizes.idle_connections + 1000 if "idle" in names else max(sizes.scaling) + 1000
    if nofile < needed:
        print(f"bench: the open-file limit is {nofile}, the run needs about {needed}", file=sys.stderr)
    started = datetime.datetime.now().astimezone()
    load_average = os.getloadavg()
    out = args.json or ROOT / "bench-results" / f"{started:%Y%m%d-%H%M%S}.json"
    tmp = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    signal.signal(signal.SIGTERM, _interrupt)
    stack: BenchStack | None = None
    pool: ClientPool | None = None
    bench: Bench | None = None
    ok = False
    try:
        if args.reference == "nchan":
            ensure_nchan()  # before minutes of Compose: fails at once, saying what to install
        log(f"bench: starting the stack ({args.mode} mode, stream transport {args.transport}) in {tmp}")
        stack = start(args, sizes, tmp, nofile)
        pool = ClientPool(args.client_processes)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            if not find_py_spy():
                log("bench: --profile needs py-spy (.venv/bin/pip install py-spy); no profiles")
        bench = Bench(stack, pool, sizes, args.profile, args.profile_native)
        if args.perf:
            if not find_perf():
                raise SystemExit("bench: --perf needs Linux perf (apt-get install linux-perf)")
            args.perf.mkdir(parents=True, exist_ok=True)
            Bench.perf_dir = args.perf  # the nchan reference's fan-out too
        log(f"bench: stream worker {stack.worker_pids('stream')}, publisher {stack.worker_pids('publisher')}")
        results = measure(args, bench, names, tmp, nofile)
        errors = results.pop("errors")
        targets = evaluate(results) if args.mode == "direct" else evaluate_compose(results)
        delivery = [bool(r.get("complete")) for _, r in delivery_items(results)]
        ok = not errors and all(delivery) and all(n in _present(results) for n in names)
        report = {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(
                [Path(sys.executable).name, "-m", "tests.load.bench", *(argv or sys.argv[1:])]
            ),
            "ok": ok,
            "mode": args.mode,
            "transport": args.transport,
            "reference": None if args.reference == "none" else args.reference,
            "scenarios_requested": names,
            "sizes": dataclasses.asdict(sizes),
            "machine": machine(load_average),
            "stack": stack.describe(),
            "routes": {r.name: dataclasses.asdict(r) for n in names for r in stack.routes(n)},
            "client_processes": args.client_processes,
            "redis_fsync": "compose"
            if args.mode == "compose"
            else args.redis_fsync
            if not args.redis_url
            else "external",
            "results": results,
            "errors": errors,
            "targets": [dataclasses.asdict(t) for t in targets],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_report(report, stack.headline(), out)
        missed = [t for t in targets if t.status == "MISS"]
        if not ok:
            return 1
        if args.fail_on_miss and missed:
            return 3
        return 0
    finally:
        for cleanup in bench.cleanups if bench is not None else []:
            with contextlib.suppress(Exception):
                cleanup()
        if pool is not None:
            pool.stop()
        if stack is not None:
            if not ok:
                print(f"bench: logs kept in {tmp}", file=sys.stderr)
            stack.stop()
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def log(text: str) -> None:
    print(text, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C: everything started is stopped in `finally`."""
    raise KeyboardInterrupt(f"signal {signum}")


def _present(results: dict[str, Any]) -> set[str]:
    return {name for name, value in results.items() if value}


def _profiles(results: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for path, r in results.get("fanout", {}).items():
        if "profile" in r:
            found.append((f"fan-out ({path}), the stream worker", str(r["profile"])))
    for size, r in results.get("scaling", {}).items():
        if "profile" in r:
            found.append((f"scaling {size}, the stream worker", str(r["profile"])))
    for path, r in results.get("publish", {}).items():
        for kind in ("single", "batched"):
            if "profile" in r[kind]:
                found.append((f"publish {kind} ({path}), one publisher worker", str(r[kind]["profile"])))
    return found


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started was stopped", file=sys.stderr)
        sys.exit(130)
