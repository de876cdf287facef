"""Webhook benchmark (issue 20): what occupancy and its webhooks cost, and how
fast the dispatcher sends.

    python -m tests.load.webhooks [--channels 2000] [--redis-url URL] [--json FILE]
    make bench-webhooks

Runs on this host, bounded in count and time: its own redis-server (unless
--redis-url), the real dispatcher (`python -m dispatcher`, one process), a
receiver on loopback answering 204, and stream workers' presence writes made
with the stream service's own code (stream/presence.py), one sync per second
per simulated worker as the hub does. It reports:

- presence: Redis CPU (commandstats, µs) per channel written, with webhooks off
  (the plain presence scripts) and on (occupancy.py): the cost webhooks add to
  a stream worker's once-a-second write;
- delivery: events per second the dispatcher sends with every lane busy, its
  CPU (µs) per event, and latency from an event's time to its arrival (p50, p99);
- the whole run: every event arrived, each id once (at least once, no duplicate
  without a failure), and per channel strictly alternating.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "stream-service"), str(ROOT / "publisher-service")]

from stream.contract import partition_of  # noqa: E402
from stream.occupancy import OCCUPIED, VACATED  # noqa: E402
from stream.presence import Presence  # noqa: E402

from tests.support.receiver import running_receiver  # noqa: E402
from tests.support.services import free_port, wait_ready  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"b" * 32).decode()
WORKERS = 4  # simulated stream workers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--channels", type=int, default=2000, help="channels occupied then vacated (<= 20000)"
    )
    parser.add_argument("--redis-url", help="an existing Redis (flushed!); default: start redis-server")
    parser.add_argument("--json", type=Path, help="write the report here too")
    parser.add_argument("--batch", type=int, default=1, help="WEBHOOK_BATCH_MAX of the dispatcher (1-100)")
    args = parser.parse_args()
    if not 1 <= args.channels <= 20000:
        parser.error("--channels must be 1 to 20000")
    with redis_server(args.redis_url) as url:
        report = run(url, args.channels, args.batch)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if not report["delivery"]["complete"]:
        sys.exit(1)


class redis_server:
    """A throwaway redis-server on a free loopback port (or the given URL)."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.process: subprocess.Popen[bytes] | None = None
        self.dir: str | None = None

    def __enter__(self) -> str:
        if self.url:
            return self.url
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is missing (apt-get install redis-server), or pass --redis-url")
        port = free_port()
        self.dir = tempfile.mkdtemp(prefix="herald-bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def run(url: str, channels: int, batch: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushall()
    names = [f"bench.{i}" for i in range(channels)]
    report: dict[str, Any] = {"channels": channels, "workers": WORKERS, "batch": batch}
    report["presence_off"] = presence_cost(client, names, None)
    client.flushall()
    with running_receiver() as receiver:
        report["presence_on"] = presence_cost(client, names, 0.0)  # writes the events too
        events = 2 * channels
        # The backlog is held back (503) until the dispatcher has started and taken
        # its lanes, so the drain is timed alone.
        gate = {"open": False}
        receiver.answer = lambda r: (204, {}, 0.0) if gate["open"] else (503, {}, 0.0)
        dispatcher = start_dispatcher(url, receiver.url, batch)
        try:
            time.sleep(1.0)
            report["delivery"] = delivery(receiver, dispatcher, events, gate)
            LATENCY_START[0] = time.monotonic()
            report["latency"] = latency(client, receiver, 200, 50.0)
        finally:
            dispatcher.send_signal(signal.SIGTERM)
            dispatcher.wait(30)
    on, off = report["presence_on"]["redis_us_per_channel"], report["presence_off"]["redis_us_per_channel"]
    report["presence_added_us_per_channel"] = round(on - off, 2)
    return report


def presence_cost(client: redis.Redis, names: list[str], delay: float | None) -> dict[str, Any]:
    """Each simulated worker takes a share of the channels, then leaves them:
    Redis CPU per channel written (occupy + leave), from INFO commandstats."""
    workers = [Presence(lambda: client, 30.0, delay) for _ in range(WORKERS)]
    client.config_resetstat()
    started = time.monotonic()
    for i, w in enumerate(workers):
        w.sync({(partition_of(n, 1), n): 1 for n in names[i::WORKERS]})
    for w in workers:
        w.sync({})
    if delay is not None:  # vacated events are the dispatcher's sweep's; run it here, timed with the rest
        from dispatcher.sweeper import sweep

        while sweep(client, 0, 0.0)[0]:
            pass
    elapsed = time.monotonic() - started
    stats: Any = client.info("commandstats")
    usec = sum(
        v["usec"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_zrange")
    )
    return {
        "mode": "off" if delay is None else "on",
        "redis_us_per_channel": round(usec / len(names), 2),
        "wall_s": round(elapsed, 3),
    }


def start_dispatcher(url: str, receiver_url: str, batch: int) -> subprocess.Popen[bytes]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": url,
        "WEBHOOK_URL": receiver_url,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_VACATED_DELAY_SECONDS": "0",
        "WEBHOOK_TIMEOUT_SECONDS": "5",
        "DISPATCHER_PORT": str(port),
        "WEBHOOK_BATCH_MAX": str(batch),
        "WEBHOOK_BACKOFF_MAX_SECONDS": "0.2",  # held back at the start only: resume at once
        "LOG_LEVEL": "warning",
    }
    profile = os.environ.get("HERALD_BENCH_PROFILE")  # a cProfile output file, to find the cost
    command = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), "-m", "dispatcher"]
    process = subprocess.Popen(
        command,
        cwd=ROOT / "publisher-service",
        env=env,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(f"http://127.0.0.1:{port}/readyz", process=process)
    return process


def delivery(
    receiver: Any, dispatcher: subprocess.Popen[bytes], events: int, gate: dict[str, bool]
) -> dict[str, Any]:
    """Drain the backlog (bounded): rate with every lane busy, CPU per event, and the checks."""
    cpu_before = cpu_seconds(dispatcher.pid)
    started = time.monotonic()
    gate["open"] = True
    deadline = started + max(60.0, events / 50)
    while time.monotonic() < deadline and len({e["id"] for _, e in taken(receiver, "bench.")}) < events:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(dispatcher.pid) - cpu_before
    ids = [e["id"] for _, e in taken(receiver, "bench.")]  # events' ids: a batch carries several
    per_channel: dict[str, list[str]] = {}
    for _, e in taken(receiver, "bench."):
        per_channel.setdefault(e["data"]["channel"], []).append(e["type"])
    alternating = all(kinds == [OCCUPIED, VACATED][: len(kinds)] for kinds in per_channel.values())
    return {
        "events": events,
        "received": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "complete": len(set(ids)) == events and alternating,
        "alternating": alternating,
        "wall_s": round(elapsed, 2),
        "events_per_s": round(len(set(ids)) / elapsed, 1) if elapsed else None,
        "posts": len([r for r in receiver.taken("bench.") if r.status == 204]),
        "dispatcher_cpu_us_per_event": round(cpu * 1e6 / max(1, len(ids)), 1),
    }


def taken(receiver: Any, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    """(webhook-id, event) of the events the receiver took (204)."""
    return [(r.id, e) for r in receiver.taken(prefix) if r.status == 204 for e in r.events()]


def latency(client: redis.Redis, receiver: Any, count: int, rate: float) -> dict[str, Any]:
    """`count` channels occupied one by one at `rate` per second, the dispatcher
    idle and waiting: from each event's time (Redis's clock) to its arrival."""
    worker = Presence(lambda: client, 30.0, 0.0)
    names = [f"live.{i}" for i in range(count)]
    held: dict[tuple[int, str], int] = {}
    for i, name in enumerate(names):
        held[(partition_of(name, 1), name)] = 1
        worker.sync(dict(held))  # writes only the new channel (as the hub, a new dict each time)
        time.sleep(max(0.0, (i + 1) / rate - (time.monotonic() - LATENCY_START[0])))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(receiver.taken("live.")) < count:
        time.sleep(0.05)
    got = receiver.taken("live.")
    ms = sorted((r.wall - iso_seconds(r.json()["timestamp"])) * 1000 for r in got)
    return {
        "events": count,
        "received": len(got),
        "rate_per_s": rate,
        "latency_ms": {"p50": round(ms[len(ms) // 2], 1), "p99": round(ms[int(len(ms) * 0.99) - 1], 1)}
        if ms
        else None,
    }


LATENCY_START = [0.0]


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
