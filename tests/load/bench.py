"""Herald's load tool: `make bench` or `python -m tests.load.bench [--quick] [--scenario NAME]...`.

Starts its own stack on loopback (Redis from a local Docker image or REDIS_URL,
the publisher, ONE stream worker, nginx), runs bounded scenarios against it,
prints a table of figures next to the targets, and writes them all to
bench-results/<timestamp>.json. Correctness (every subscriber got every event
exactly once, in order) decides the exit code; speed never does, unless
--fail-on-miss is given. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
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
from tests.load.profile import Recording, find_py_spy
from tests.load.stack import Stack, cpu_seconds, machine_busy_seconds, raise_nofile, rss_kb, start_stack
from tests.support.services import ROOT

SCENARIOS = ("idle", "fanout", "publish", "many-channels", "scaling")


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

# The targets for this machine (2 cores, load tool on the same host, one stream worker).
TARGET_RSS_KB = 20.0
TARGET_IDLE_HELD = 10000
TARGET_FANOUT_CPU_US = 15.0
TARGET_FLAT_RATIO = 1.2  # 2k and 4k within +20% of the 1k figure
TARGET_P99_MS = 30.0
TARGET_PUBLISHES_PER_S = 5000.0
TARGET_PUBLISH_CPU_US = 150.0
TARGET_BATCH_EVENTS_PER_S = 50000.0
# Above this many events per client read the stream worker was behind and batched its
# writes: its CPU per delivery is then lower than that of a worker that keeps up.
BATCHED_EVENTS_PER_READ = 1.1


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


class ScenarioFailed(Exception):
    pass


class Bench:
    def __init__(
        self, stack: Stack, pool: ClientPool, sizes: Sizes, profile_dir: Path | None, native: bool = False
    ) -> None:
        self.native = native
        self.stack = stack
        self.pool = pool
        self.sizes = sizes
        self.run_id = secrets.token_hex(3)
        self.profile_dir = profile_dir
        self.stats_conn = HttpConnection(stack.stream.port)
        self.publisher_workers = stack.publisher_workers()
        self.stream_workers = stack.stream_workers()
        self.redis_pids = stack.redis.pids()

    # -- helpers -------------------------------------------------------------

    def ports(self, path: str) -> tuple[int, int]:
        """(stream port, publish port) for `direct` or `nginx`."""
        if path == "nginx":
            return self.stack.nginx.port, self.stack.nginx.port
        return self.stack.stream.port, self.stack.publisher.port

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

    async def open_streams(self, port: int, paths: list[str]) -> dict[str, Any]:
        """Open the streams over the client processes; wait until each is live (or failed)."""
        count = len(self.pool.pipes)
        shares = [paths[i::count] for i in range(count)]
        timeout = 30 + len(paths) / 250
        answers = await self.pool.call(
            [
                {"op": "open", "port": port, "paths": share, "concurrency": 100, "timeout": timeout}
                for share in shares
            ],
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

    async def close_streams(self) -> int:
        await self.pool.broadcast({"op": "close", "timeout": 10}, 30)
        return await self.wait_clients(0)

    def cpu(self, pids: list[int]) -> float:
        return cpu_seconds(pids)

    def nginx_cpu(self) -> float:
        return cpu_seconds(self.stack.nginx.worker_pids())

    async def publish_paced(
        self, port: int, count: int, rate: float, body: Callable[[int], bytes]
    ) -> dict[str, Any]:
        """Publish `count` requests one after another on one connection, `rate` per second."""
        conn = HttpConnection(port)
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
                status, answer = await conn.post("/publish", body(i))
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1
                if status != 202:
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

    async def deliver(
        self,
        *,
        name: str,
        path: str,
        paths: list[str],
        events_each: int,
        publish: Callable[[], Awaitable[Any]],
        publish_seconds: float,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """Open streams, publish, collect: delivery, latency and CPU figures."""
        stream_port, _ = self.ports(path)
        opened = await self.open_streams(stream_port, paths)
        if opened["live"] != len(paths):
            await self.close_streams()
            raise ScenarioFailed(f"{name}: only {opened['live']} of {len(paths)} streams opened: {opened}")
        seen = await self.wait_clients(len(paths))
        if seen != len(paths):
            await self.close_streams()
            raise ScenarioFailed(f"{name}: the stream worker counts {seen} clients, expected {len(paths)}")
        await self.pool.broadcast({"op": "expect", "count": events_each}, 30)
        recording = None
        if profile and self.profile_dir is not None:
            binary = find_py_spy()
            if binary:
                out = self.profile_dir / f"{profile}.txt"
                recording = Recording(
                    binary, self.stream_workers[0], publish_seconds + 1, out, native=self.native
                )
                await asyncio.sleep(0.5)  # py-spy attaches
        before = await self.stats()
        stream0, nginx0, client0 = self.cpu(self.stream_workers), self.nginx_cpu(), self.cpu(self.pool.pids)
        redis0, publisher0 = self.cpu(self.redis_pids), self.cpu(self.publisher_workers)
        busy0, own0 = machine_busy_seconds(), self.cpu([os.getpid()])
        wall0 = time.time()
        published = await publish()
        # A worker that falls behind still delivers everything, late: wait for it, within bounds.
        patience = 20 + publish_seconds + len(paths) * events_each / 10000
        answers = await self.pool.broadcast({"op": "collect", "timeout": patience}, patience + 30)
        wall1 = time.time()
        stream1, nginx1, client1 = self.cpu(self.stream_workers), self.nginx_cpu(), self.cpu(self.pool.pids)
        redis1, publisher1 = self.cpu(self.redis_pids), self.cpu(self.publisher_workers)
        busy1, own1 = machine_busy_seconds(), self.cpu([os.getpid()])
        after = await self.stats()
        profile_summary = recording.finish() if recording else None
        latencies: array[float] = array("d")
        indexes: array[int] = array("i")
        for answer in answers:
            latencies.frombytes(answer["latencies"])
            indexes.frombytes(answer["indexes"])
        received = sum(int(a["received"]) for a in answers)
        expected = len(paths) * events_each
        complete = sum(int(a["complete"]) for a in answers)
        last = max((float(a["last_event_at"]) for a in answers), default=0.0) or wall1
        span = max(last - wall0, 1e-9)
        stream_cpu = stream1 - stream0
        ours = (
            stream_cpu
            + (nginx1 - nginx0)
            + (client1 - client0)
            + (redis1 - redis0)
            + (publisher1 - publisher0)
            + (own1 - own0)
        )
        delivered = int(after["delivered"]) - int(before["delivered"])
        closed = await self.close_streams()
        result = {
            "streams": len(paths),
            "events_each": events_each,
            "expected_deliveries": expected,
            "received": received,
            "complete_streams": complete,
            "events_per_read": received / max(sum(int(a["reads"]) for a in answers), 1),
            "errors": sum(int(a["errors"]) for a in answers),
            "closed_early": sum(int(a["closed_early"]) for a in answers),
            "complete": complete == len(paths) and received == expected,
            "hub_delivered": delivered,
            "dropped_slow": int(after["dropped_slow"]) - int(before["dropped_slow"]),
            "latency_ms": percentiles(latencies),
            "latency_ms_by_tenth": by_tenth(latencies, indexes, events_each),
            "seconds": span,
            "deliveries_per_s": received / span,
            "stream_cpu_s": stream_cpu,
            "stream_cpu_us_per_delivery": 1e6 * stream_cpu / max(received, 1),
            "stream_cpu_share": stream_cpu / span,
            "nginx_cpu_s": nginx1 - nginx0 if path == "nginx" else 0.0,
            "client_cpu_s": client1 - client0,
            "redis_cpu_s": redis1 - redis0,
            "publisher_cpu_s": publisher1 - publisher0,
            "others_cpu_share": others_share(busy1 - busy0, ours, wall1 - wall0),
            "client_cpu_us_per_delivery": 1e6 * (client1 - client0) / max(received, 1),
            "open": opened,
            "publish": published,
            "clients_after_close": closed,
        }
        if profile_summary is not None:
            result["profile"] = profile_summary
        return result

    # -- scenarios -------------------------------------------------------------

    async def idle(self, connections: int) -> dict[str, Any]:
        s = self.sizes
        worker = self.stream_workers[0]
        channels = [f"bench.{self.run_id}.idle.{i % s.idle_channels}" for i in range(connections)]
        # Warm up the code paths (first request, first subscription) before the baseline.
        warm = await self.open_streams(
            self.stack.stream.port, [f"/stream?channel={c}" for c in channels[:20]]
        )
        await self.close_streams()
        await asyncio.sleep(0.5)
        rss0 = rss_kb(worker)
        opened = await self.open_streams(self.stack.stream.port, [f"/stream?channel={c}" for c in channels])
        held = await self.wait_clients(opened["live"])
        await asyncio.sleep(1)
        rss1 = rss_kb(worker)
        cpu0, t0 = self.cpu([worker]), time.monotonic()
        await asyncio.sleep(s.idle_seconds)
        cpu1, t1 = self.cpu([worker]), time.monotonic()
        rss2 = rss_kb(worker)
        stats = await self.stats()
        closed = await self.close_streams()
        live = int(opened["live"])
        peak = max(rss1, rss2)
        return {
            "connections": connections,
            "channels": min(s.idle_channels, connections),
            "live": live,
            "held_by_worker": held,
            "complete": live == connections and held == connections,
            "failures": opened["failures"],
            "open_seconds": opened["open_seconds"],
            "rss_kb_before": rss0,
            "rss_kb_open": rss1,
            "rss_kb_after_idle": rss2,
            "rss_kb_per_connection": (peak - rss0) / max(live, 1),
            "idle_seconds": t1 - t0,
            "idle_cpu_s": cpu1 - cpu0,
            "idle_cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0),
            "idle_cpu_us_per_connection_second": 1e6 * (cpu1 - cpu0) / max(live, 1) / (t1 - t0),
            "heartbeat_seconds": float(self.stack.stream.env.get("HEARTBEAT_SECONDS", "15")),
            "hub_channels": stats["channels"],
            "warmup": warm["live"],
            "clients_after_close": closed,
        }

    async def fanout(self, path: str, subscribers: int, profile: str | None = None) -> dict[str, Any]:
        s = self.sizes
        channel = f"bench.{self.run_id}.fan.{path}.{subscribers}"
        _, publish_port = self.ports(path)

        def body(i: int) -> bytes:
            return json.dumps({"channel": channel, "data": [i, time.time()]}).encode()

        async def publish() -> Any:
            return await self.publish_paced(publish_port, s.fanout_events, s.fanout_rate, body)

        result = await self.deliver(
            name=f"fanout {path} {subscribers}",
            path=path,
            paths=[f"/stream?channel={channel}"] * subscribers,
            events_each=s.fanout_events,
            publish=publish,
            publish_seconds=s.fanout_events / s.fanout_rate,
            profile=profile,
        )
        result["rate_events_per_s"] = s.fanout_rate
        return result

    async def many_channels(self) -> dict[str, Any]:
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
            return await self.publish_paced(self.stack.publisher.port, requests, rate, body)

        result = await self.deliver(
            name="many-channels",
            path="direct",
            paths=[f"/stream?channel={c}" for c in channels],
            events_each=s.channel_events,
            publish=publish,
            publish_seconds=requests / rate,
        )
        result["rate_events_per_s"] = s.channel_rate
        result["batch_size"] = s.batch_size
        return result

    async def publish_load(
        self, path: str, *, total_events: int, batch: int, concurrency: int
    ) -> dict[str, Any]:
        """POST as fast as the service answers, `concurrency` requests in flight, no subscribers."""
        _, port = self.ports(path)
        channel = f"bench.{self.run_id}.pub.{path}"
        requests = total_events // batch
        if batch == 1:
            bodies = [json.dumps({"channel": channel, "data": i}).encode() for i in range(requests)]
        else:
            bodies = [
                json.dumps([{"channel": channel, "data": r * batch + j} for j in range(batch)]).encode()
                for r in range(requests)
            ]
        counter = itertools.count()
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        conns = [HttpConnection(port) for _ in range(concurrency)]

        async def runner(conn: HttpConnection) -> None:
            while (i := next(counter)) < requests:
                t = time.perf_counter()
                status, _ = await conn.post("/publish", bodies[i])
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1

        recording = None
        binary = find_py_spy()
        if self.profile_dir is not None and binary:
            out = self.profile_dir / f"publish-{path}-batch{batch}.txt"
            recording = Recording(binary, self.publisher_workers[0], 120, out, native=self.native)
            await asyncio.sleep(0.5)  # py-spy attaches
        client = redis.Redis.from_url(self.stack.redis.url)
        try:
            seq0 = int(client.hget("herald:meta", "seq") or 0)
            pub0, nginx0, own0 = self.cpu(self.publisher_workers), self.nginx_cpu(), self.cpu([os.getpid()])
            redis0, busy0 = self.cpu(self.redis_pids), machine_busy_seconds()
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(asyncio.gather(*(runner(c) for c in conns)), 60 + requests / 100)
            finally:
                for conn in conns:
                    conn.close()
            elapsed = time.perf_counter() - t0
            pub1, nginx1, own1 = self.cpu(self.publisher_workers), self.nginx_cpu(), self.cpu([os.getpid()])
            redis1, busy1 = self.cpu(self.redis_pids), machine_busy_seconds()
            seq1 = int(client.hget("herald:meta", "seq") or 0)
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
            "publisher_cpu_s": pub1 - pub0,
            "publisher_cpu_us_per_request": 1e6 * (pub1 - pub0) / max(requests, 1),
            "publisher_cpu_us_per_event": 1e6 * (pub1 - pub0) / max(requests * batch, 1),
            "nginx_cpu_s": nginx1 - nginx0 if path == "nginx" else 0.0,
            "client_cpu_s": own1 - own0,
            "redis_cpu_s": redis1 - redis0,
            "redis_cpu_us_per_event": 1e6 * (redis1 - redis0) / max(requests * batch, 1),
            "others_cpu_share": others_share(
                busy1 - busy0, (pub1 - pub0) + (nginx1 - nginx0) + (own1 - own0) + (redis1 - redis0), elapsed
            ),
            "connections_opened": sum(c.connects for c in conns),
        }

    async def publish(self, path: str) -> dict[str, Any]:
        s = self.sizes
        single = await self.publish_load(
            path, total_events=s.publish_count, batch=1, concurrency=s.publish_concurrency
        )
        batched = await self.publish_load(
            path, total_events=s.batch_events, batch=s.batch_size, concurrency=s.batch_concurrency
        )
        return {"single": single, "batched": batched, "complete": single["complete"] and batched["complete"]}

    def cleanup_redis(self) -> None:
        """Remove this run's channels from Redis (matters when REDIS_URL is someone's Redis)."""
        client = redis.Redis.from_url(self.stack.redis.url)
        try:
            prefix = f"bench.{self.run_id}."
            keys = list(itertools.islice(client.scan_iter(f"herald:stream:{prefix}*", count=1000), 100000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
            fields = [k.decode()[len("herald:stream:") :] for k in keys]
            for i in range(0, len(fields), 1000):
                client.hdel("herald:channels", *fields[i : i + 1000])
        finally:
            client.close()


# -- targets and the table ------------------------------------------------------------------


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    status: str  # PASS, MISS or n/a


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def evaluate(results: dict[str, Any]) -> list[Target]:
    targets: list[Target] = []
    delivery = [(name, bool(r.get("complete"))) for name, r in _delivery_items(results)]
    if delivery:
        bad = [n for n, ok in delivery if not ok]
        targets.append(
            Target(
                "delivery",
                "100% in order, every scenario",
                "all complete" if not bad else "incomplete: " + ", ".join(bad),
                _verdict(not bad),
            )
        )
    idle = results.get("idle")
    if idle:
        rss = idle["rss_kb_per_connection"]
        targets.append(
            Target(
                "idle RSS",
                f"<= {TARGET_RSS_KB:g} KB per connection",
                f"{rss:.1f} KB ({idle['connections']:,} conns)",
                _verdict(rss <= TARGET_RSS_KB),
            )
        )
        held = idle["held_by_worker"]
        ran = idle["connections"] >= TARGET_IDLE_HELD
        targets.append(
            Target(
                "idle connections",
                f"one worker holds {TARGET_IDLE_HELD:,}",
                f"held {held:,} of {idle['connections']:,}"
                + ("" if ran else f" (run --idle-connections {TARGET_IDLE_HELD})"),
                _verdict(held >= TARGET_IDLE_HELD if ran else None),
            )
        )
    for path, r in results.get("fanout", {}).items():
        cpu = r["stream_cpu_us_per_delivery"]
        targets.append(
            Target(
                f"fan-out CPU ({path})",
                f"<= {TARGET_FANOUT_CPU_US:g} us/delivery",
                f"{cpu:.1f} us{_batched(r)}",
                _verdict(cpu <= TARGET_FANOUT_CPU_US),
            )
        )
        p99 = r["latency_ms"]["p99"]
        targets.append(
            Target(
                f"fan-out p99 ({path})",
                f"<= {TARGET_P99_MS:g} ms at {r['streams']:,} x {r['rate_events_per_s']:g}/s",
                f"{p99:.1f} ms",
                _verdict(p99 <= TARGET_P99_MS),
            )
        )
    scaling = results.get("scaling")
    if scaling:
        sizes = sorted(scaling, key=int)
        figures = [scaling[k]["stream_cpu_us_per_delivery"] for k in sizes]
        base = figures[0]
        targets.append(
            Target(
                "fan-out CPU flat",
                f"{' / '.join(sizes)} subs: <= {TARGET_FANOUT_CPU_US:g} us, "
                f"each <= {TARGET_FLAT_RATIO:g}x the first",
                " / ".join(f"{f:.1f}" for f in figures)
                + " us"
                + "".join(_batched(scaling[k]) for k in sizes[-1:]),
                _verdict(
                    all(f <= TARGET_FANOUT_CPU_US for f in figures)
                    and all(f <= base * TARGET_FLAT_RATIO for f in figures)
                ),
            )
        )
    for path, r in results.get("publish", {}).items():
        single, batched = r["single"], r["batched"]
        if path == "nginx":
            rate = single["requests_per_s"]
            targets.append(
                Target(
                    "publishes/s (nginx)",
                    f">= {TARGET_PUBLISHES_PER_S:,.0f} single-event",
                    f"{rate:,.0f}/s",
                    _verdict(rate >= TARGET_PUBLISHES_PER_S),
                )
            )
        cpu = single["publisher_cpu_us_per_request"]
        targets.append(
            Target(
                f"publisher CPU ({path})",
                f"<= {TARGET_PUBLISH_CPU_US:g} us/publish",
                f"{cpu:.0f} us",
                _verdict(cpu <= TARGET_PUBLISH_CPU_US),
            )
        )
        events = batched["events_per_s"]
        targets.append(
            Target(
                f"batched events/s ({path})",
                f">= {TARGET_BATCH_EVENTS_PER_S:,.0f}",
                f"{events:,.0f}/s",
                _verdict(events >= TARGET_BATCH_EVENTS_PER_S),
            )
        )
    return targets


def _batched(r: dict[str, Any]) -> str:
    """A warning when the figure comes from a worker that fell behind and wrote several events at once."""
    per_read = float(r.get("events_per_read", 1.0))
    if per_read <= BATCHED_EVENTS_PER_READ:
        return ""
    return f" (behind: {per_read:.1f} ev/read)"


def _delivery_items(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    items: list[tuple[str, dict[str, Any]]] = []
    if "idle" in results:
        items.append(("idle", results["idle"]))
    for path, r in results.get("fanout", {}).items():
        items.append((f"fanout/{path}", r))
    for path, r in results.get("publish", {}).items():
        items.append((f"publish/{path}", r))
    if "many-channels" in results:
        items.append(("many-channels", results["many-channels"]))
    for size, r in results.get("scaling", {}).items():
        items.append((f"scaling/{size}", r))
    return items


def _lat(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """The figures table: one row per scenario and path."""
    table = [
        [
            "scenario",
            "path",
            "load",
            "delivered",
            "latency ms p50/p95/p99/max",
            "server CPU",
            "rate",
            "ev/read",
            "others",
        ]
    ]
    idle = results.get("idle")
    if idle:
        table.append(
            [
                "idle",
                "direct",
                f"{idle['connections']:,} conns",
                f"{idle['held_by_worker']:,} held",
                "-",
                f"{idle['rss_kb_per_connection']:.1f} KB/conn; {idle['idle_cpu_percent']:.2f}% "
                f"of a core over {idle['idle_seconds']:.0f} s",
                "-",
                "-",
                "-",
            ]
        )

    def delivery_row(name: str, path: str, r: dict[str, Any]) -> list[str]:
        return [
            name,
            path,
            f"{r['streams']:,} x {r['events_each']} ev @ {r['rate_events_per_s']:g}/s",
            f"{r['received']:,}/{r['expected_deliveries']:,}" + ("" if r["complete"] else " INCOMPLETE"),
            _lat(r),
            f"{r['stream_cpu_us_per_delivery']:.1f} us/delivery ({100 * r['stream_cpu_share']:.0f}% core)",
            f"{r['deliveries_per_s']:,.0f} deliveries/s",
            f"{r['events_per_read']:.2f}",
            f"{100 * r['others_cpu_share']:.0f}%",
        ]

    for path, r in results.get("fanout", {}).items():
        table.append(delivery_row("fan-out", path, r))
    if "many-channels" in results:
        table.append(delivery_row("many-channels", "direct", results["many-channels"]))
    for size, r in sorted(results.get("scaling", {}).items(), key=lambda kv: int(kv[0])):
        table.append(
            delivery_row(
                f"scaling {int(size) // 1000 or size}k" if int(size) >= 1000 else "scaling", "direct", r
            )
        )
    for path, r in results.get("publish", {}).items():
        single, batched = r["single"], r["batched"]
        table.append(
            [
                "publish",
                path,
                f"{single['requests']:,} single, {single['concurrency']} in flight",
                f"{single['statuses'].get('202', 0):,} x 202",
                _lat(single),
                f"{single['publisher_cpu_us_per_request']:.0f} us/publish",
                f"{single['requests_per_s']:,.0f} publishes/s",
                "-",
                f"{100 * single['others_cpu_share']:.0f}%",
            ]
        )
        table.append(
            [
                "publish batch",
                path,
                f"{batched['requests']:,} x {batched['batch']} ev, {batched['concurrency']} in flight",
                f"{batched['statuses'].get('202', 0):,} x 202",
                _lat(batched),
                f"{batched['publisher_cpu_us_per_event']:.1f} us/event",
                f"{batched['events_per_s']:,.0f} events/s",
                "-",
                f"{100 * batched['others_cpu_share']:.0f}%",
            ]
        )
    return table


def format_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.load.bench", description=__doc__.split("\n\n")[0])
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
        "--publisher-workers", type=int, default=2, help="publisher WEB_CONCURRENCY (default 2)"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="use this Redis (else Docker)"
    )
    parser.add_argument(
        "--redis-fsync",
        choices=("always", "everysec", "no"),
        default="always",
        help="appendfsync of the bench's Redis (default always, as compose.yaml)",
    )
    parser.add_argument("--profile", type=Path, help="record py-spy profiles of the stream worker here")
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: include C frames (py-spy --native pauses the process: figures skew)",
    )
    parser.add_argument("--max-seconds", type=float, default=1800, help="hard limit for the whole run")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 3 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    if args.idle_connections is not None and not 1 <= args.idle_connections <= 20000:
        parser.error("--idle-connections must be 1..20000")
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


async def run_scenarios(bench: Bench, names: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    s = bench.sizes
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    async def attempt(label: str, step: Awaitable[Any]) -> Any:
        log(f"  {label} ...")
        started = time.monotonic()
        try:
            value = await step
        except (ScenarioFailed, TimeoutError, OSError, redis.RedisError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
            log(f"  {label}: FAILED {errors[label]}")
            with contextlib.suppress(Exception):
                await bench.close_streams()
            return None
        log(f"  {label}: done in {time.monotonic() - started:.1f} s")
        return value

    if "idle" in names:
        value = await attempt("idle", bench.idle(s.idle_connections))
        if value is not None:
            results["idle"] = value
    if "fanout" in names:
        results["fanout"] = {}
        for path in ("direct", "nginx"):
            value = await attempt(
                f"fanout/{path}",
                bench.fanout(path, s.fanout_subscribers, profile=f"fanout-{path}"),
            )
            if value is not None:
                results["fanout"][path] = value
    if "publish" in names:
        results["publish"] = {}
        for path in ("direct", "nginx"):
            value = await attempt(f"publish/{path}", bench.publish(path))
            if value is not None:
                results["publish"][path] = value
    if "many-channels" in names:
        value = await attempt("many-channels", bench.many_channels())
        if value is not None:
            results["many-channels"] = value
    if "scaling" in names:
        results["scaling"] = {}
        for size in s.scaling:
            value = await attempt(f"scaling/{size}", bench.fanout("direct", size, profile=f"scaling-{size}"))
            if value is not None:
                results["scaling"][str(size)] = value
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.scenario or SCENARIOS))
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
    stack: Stack | None = None
    pool: ClientPool | None = None
    ok = False
    report: dict[str, Any] = {}
    try:
        log(f"bench: starting the stack in {tmp}")
        stack = start_stack(
            tmp,
            redis_url=args.redis_url,
            publisher_workers=args.publisher_workers,
            max_connections=max(10000, sizes.idle_connections + 500),
            nofile=nofile,
            redis_fsync=args.redis_fsync,
        )
        deadline = time.monotonic() + 20
        while len(stack.publisher_workers()) < args.publisher_workers and time.monotonic() < deadline:
            time.sleep(0.1)
        pool = ClientPool(args.client_processes)
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            if not find_py_spy():
                log("bench: --profile needs py-spy (.venv/bin/pip install py-spy); no profiles")
        bench = Bench(stack, pool, sizes, args.profile, args.profile_native)
        log(f"bench: stream worker {bench.stream_workers}, publisher workers {bench.publisher_workers}")

        async def run() -> dict[str, Any]:
            try:
                return await asyncio.wait_for(run_scenarios(bench, names, log), args.max_seconds)
            finally:
                bench.stats_conn.close()

        results = asyncio.run(run())
        with contextlib.suppress(Exception):
            bench.cleanup_redis()
        errors = results.pop("errors")
        targets = evaluate(results)
        delivery = [bool(r.get("complete")) for _, r in _delivery_items(results)]
        ok = not errors and all(delivery) and all(n in _present(results) for n in names)
        report = {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(
                [Path(sys.executable).name, "-m", "tests.load.bench", *(argv or sys.argv[1:])]
            ),
            "ok": ok,
            "scenarios_requested": names,
            "sizes": dataclasses.asdict(sizes),
            "machine": machine(load_average),
            "stack": stack.describe(),
            "client_processes": args.client_processes,
            "redis_fsync": args.redis_fsync if not args.redis_url else "external",
            "results": results,
            "errors": errors,
            "targets": [dataclasses.asdict(t) for t in targets],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print()
        print(
            f"Herald bench {report['started']}: {os.cpu_count()} CPUs, load average at start "
            f"{' '.join(f'{x:.2f}' for x in report['machine']['load_average_at_start'])}; "
            f"publisher {len(bench.publisher_workers)} workers, stream 1 worker; "
            f"nginx {report['stack']['nginx']['version']}, Redis {report['stack']['redis']['version']}"
        )
        print()
        print(format_table(rows(results)))
        print()
        print(
            format_table(
                [["target", "goal", "measured", ""]]
                + [[t.name, t.goal, t.measured, t.status] for t in targets]
            )
        )
        for label, error in errors.items():
            print(f"\nFAILED {label}: {error}")
        for label, r in _profiles(results):
            print(f"\nprofile during {label}:\n{r}")
        print(f"\nresults written to {out}")
        missed = [t for t in targets if t.status == "MISS"]
        if not ok:
            return 1
        if args.fail_on_miss and missed:
            return 3
        return 0
    finally:
        if pool is not None:
            pool.stop()
        if stack is not None:
            if not ok:
                print(f"bench: service logs kept in {tmp}", file=sys.stderr)
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
