"""TLS and HTTP/2 benchmark (issue 21): what the front door's HTTPS costs per
delivered event, and what HTTP/2 changes, on the Compose stack as users run it.

    python -m tests.load.tls [--subscribers 100] [--events 200] [--rate 20] [--json FILE]
    make bench-tls

One Compose stack with a certificate from scripts/dev-cert.sh (so nginx
listens on HERALD_PORT and, with TLS and HTTP/2, on HERALD_TLS_PORT). The same
subscribers (httpx, in this process) are measured three ways, one after the
other, each on its own channel:

- `http/1.1`: plain HTTP, a connection per stream (as without a certificate);
- `https h1`: TLS, HTTP/1.1, a connection per stream;
- `https h2`: TLS, HTTP/2, every stream on ONE connection (as a browser does).

For each, `--events` events are published at `--rate` per second over plain
HTTP (the same cost in every row) and every subscriber must get each of them
once, in order. Reported per row: nginx's CPU (its container's cgroup) and
docker-proxy's (the host port's userland proxy, which copies the bytes, TLS or
not) per delivery, the connections the subscribers held, and latency from
publish to arrival (p50, p99). Bounded: at most 1,000 subscribers (128 per
HTTP/2 connection, nginx's http2_max_concurrent_streams), 10,000 events, and
--max-seconds for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests

from tests.load.compose import ComposeStack, proxy_pids, start_compose
from tests.load.stack import cpu_seconds
from tests.support.services import ROOT, free_port
from tests.support.sse import SSEParser

STREAMS_PER_H2_CONNECTION = 128  # nginx's http2_max_concurrent_streams (herald-tls.inc.template)


@dataclass
class Subscriber:
    """One stream's arrivals: (event id, index, latency in seconds)."""

    arrivals: list[tuple[str, int, float]] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Way:
    name: str
    tls: bool
    http2: bool


WAYS = (Way("http/1.1", False, False), Way("https h1", True, False), Way("https h2", True, True))


async def read_stream(client: httpx.AsyncClient, url: str, sub: Subscriber, expected: int) -> None:
    """Read one stream until `expected` events came (or the caller cancels)."""
    parser = SSEParser()
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:200]!r}")
        async for chunk in response.aiter_raw():
            now = time.time()
            for frame in parser.feed(chunk):
                if "retry" in frame.fields:
                    sub.opened.set()
                if frame.event is None or frame.event.event != "message":
                    continue
                index, sent = json.loads(frame.event.data)
                sub.arrivals.append((str(frame.event.id), int(index), now - float(sent)))
            if len(sub.arrivals) >= expected:
                return


def publish_all(base: str, channel: str, events: int, rate: float, deadline: float) -> list[str]:
    """Publish `events` events at `rate` per second; their ids, in order."""
    ids = []
    with requests.Session() as session:
        start = time.monotonic()
        for index in range(events):
            wait = start + index / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if time.monotonic() > deadline:
                raise RuntimeError("out of time while publishing")
            answer = session.post(
                f"{base}/publish",
                json={"channel": channel, "event": "message", "data": [index, time.time()]},
                timeout=10,
            )
            answer.raise_for_status()
            ids.append(str(answer.json()["id"]))
    return ids


def clients_for(way: Way, subscribers: int, ca: str) -> list[httpx.AsyncClient]:
    """The httpx clients for one way: one per HTTP/2 connection, or one pool."""
    timeout = httpx.Timeout(30.0, read=None)
    if way.http2:
        count = -(-subscribers // STREAMS_PER_H2_CONNECTION)
        limits = httpx.Limits(max_connections=1)
        return [
            httpx.AsyncClient(http2=True, verify=ca, timeout=timeout, limits=limits) for _ in range(count)
        ]
    limits = httpx.Limits(max_connections=subscribers, max_keepalive_connections=0)
    verify: Any = ca if way.tls else False
    return [httpx.AsyncClient(http1=True, http2=False, verify=verify, timeout=timeout, limits=limits)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    stack: ComposeStack, way: Way, args: argparse.Namespace, ca: str, deadline: float
) -> dict[str, Any]:
    """One row: open the streams, publish, wait for every delivery, check them, count."""
    base = f"http://127.0.0.1:{stack.port}"
    origin = f"https://127.0.0.1:{stack.settings['HERALD_TLS_PORT']}" if way.tls else base
    channel = f"tls-bench-{way.name.replace(' ', '-').replace('/', '')}-{int(time.time())}"
    clients = clients_for(way, args.subscribers, ca)
    subs = [Subscriber() for _ in range(args.subscribers)]
    tasks = [
        asyncio.create_task(
            read_stream(clients[n % len(clients)], f"{origin}/stream?channel={channel}", sub, args.events)
        )
        for n, sub in enumerate(subs)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(s.opened.wait() for s in subs)), max(1, deadline - time.monotonic())
        )
        nginx, proxies = (
            stack.containers["nginx"].cgroup,
            proxy_pids(stack.port) + proxy_pids(int(stack.settings["HERALD_TLS_PORT"])),
        )
        before = (nginx.cpu_seconds(), cpu_seconds(proxies))
        connections = held_connections(stack)
        ids = await asyncio.to_thread(publish_all, base, channel, args.events, args.rate, deadline)
        await asyncio.wait_for(asyncio.gather(*tasks), max(1, deadline - time.monotonic()))
        after = (nginx.cpu_seconds(), cpu_seconds(proxies))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()
    for sub in subs:
        assert [a[0] for a in sub.arrivals] == ids, (
            f"{way.name}: a subscriber's events differ from those published"
        )
    deliveries = args.subscribers * args.events
    latencies = [a[2] for sub in subs for a in sub.arrivals]
    return {
        "way": way.name,
        "deliveries": deliveries,
        "client connections": connections,
        "nginx us/delivery": round((after[0] - before[0]) / deliveries * 1e6, 2),
        "docker-proxy us/delivery": round((after[1] - before[1]) / deliveries * 1e6, 2),
        "p50 ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99 ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


def held_connections(stack: ComposeStack) -> int:
    """Established TCP connections to nginx's ports 80 and 443 from outside its
    container (docker-proxy's, one per client connection), seen in its network namespace."""
    run = subprocess.run(
        ["nsenter", "-t", str(stack.containers["nginx"].pid), "-n", "ss", "-Htn", "state", "established",
         "( sport = :80 or sport = :443 )"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    # Not the container's own health check (bash on 127.0.0.1:80, now and then).
    peers = [line.split()[-1] for line in run.stdout.splitlines() if line.strip()]
    return len([peer for peer in peers if not peer.startswith(("127.", "[::1]", "[::ffff:127."))])


def dev_cert(directory: Path) -> Path:
    """A certificate for localhost from scripts/dev-cert.sh; its directory."""
    subprocess.run(
        ["sh", str(ROOT / "scripts" / "dev-cert.sh"), str(directory)], check=True, capture_output=True
    )
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=100, help="streams per way (<= 1000)")
    parser.add_argument("--events", type=int, default=200, help="events per way (<= 10000)")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--max-seconds", type=float, default=900, help="hard limit for the whole run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if not (1 <= args.subscribers <= 1000 and 1 <= args.events <= 10000 and 0 < args.rate <= 1000):
        parser.error("--subscribers 1-1000, --events 1-10000, --rate 0-1000")
    deadline = time.monotonic() + args.max_seconds
    with tempfile.TemporaryDirectory(prefix="herald-bench-tls-") as tmp:
        certs = dev_cert(Path(tmp) / "cert")
        extra = {
            "HERALD_TLS_PORT": str(free_port()),
            "TLS_CERT_FILE": str(certs / "cert.pem"),
            "TLS_KEY_FILE": str(certs / "key.pem"),
        }
        stack = start_compose(
            Path(tmp), max_connections=args.subscribers + 1000, paths=("proxy",), extra=extra
        )
        try:
            rows = [asyncio.run(measure(stack, way, args, str(certs / "ca.pem"), deadline)) for way in WAYS]
        finally:
            stack.stop()
    print(f"{args.subscribers} subscribers x {args.events} events at {args.rate:g}/s, each way:")
    for row in rows:
        print("  " + ", ".join(f"{k}: {v}" for k, v in row.items()))
    reference = rows[0]["nginx us/delivery"] or 1
    for row in rows[1:]:
        print(
            f"  {row['way']}: nginx {row['nginx us/delivery'] / reference:.2f}x plain HTTP/1.1 per delivery"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
