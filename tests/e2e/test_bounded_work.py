"""Bounded work per stream, tried through the Compose stack's nginx (issue 16).

- A burst never cuts a reader that keeps up: batches of 100 events filling
  MAX_BODY_BYTES go to 50 readers and one client that stopped reading; the
  readers keep their one connection and get every event once, in order; the
  stalled client is cut; the stream workers' memory stays bounded.
- A resume pages its gap from history as the client drains it: 50 clients
  that resume over 16 channels full of 4 KB events and read nothing hold about
  one page each, and a live stream beside them keeps receiving at once.

The stack runs with CLIENT_BUFFER_BYTES=65536 and MAX_BODY_BYTES=262144 (the
defaults' ratio, 1 MiB to 256 KiB), tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import time
from typing import Any

import pytest

from tests.e2e.drills import (
    Drill,
    MemorySampler,
    SlowReader,
    metric_by_replica,
    mib,
    raise_nofile,
    stream_request,
    stream_stats,
)
from tests.e2e.support import Stack, wait_until
from tests.support.sse_client import open_stream

pytestmark = pytest.mark.e2e

DROPPED = "herald_slow_clients_dropped_total"
MIB = 1 << 20


def test_a_burst_cuts_only_the_client_that_does_not_drain(stack: Stack, measurements: dict[str, Any]) -> None:
    streams = stack.containers("stream-service")
    body_limit = int(stack.settings["MAX_BODY_BYTES"])
    assert body_limit > 2 * int(stack.settings["CLIENT_BUFFER_BYTES"])  # a batch is well over the buffer
    # 100 events of this filler fill a publish body to within a few hundred bytes.
    pad = body_limit // 100 - 110
    bursts = 5
    drill = Drill(
        stack, subscribers=50, rate=1, batch=100, pad=pad, max_events=100 * bursts, publish_on_enter=False
    )
    dropped_before = sum(metric_by_replica(stack, streams, DROPPED).values())
    # Straight to nginx's address: Docker's userland proxy would add megabytes of
    # socket buffers in front of the stalled client.
    nginx_ip = stack.container_ip(stack.containers("nginx")[0])
    samplers: dict[str, MemorySampler] = {}
    with drill:
        slow = SlowReader(nginx_ip, 80, [drill.channel])
        try:
            samplers.update((c, MemorySampler(c)) for c in streams)
            # 1. Bursts of 100 events, each a full publish body, to 50 readers and the stalled client.
            drill.start_publishing()
            drill.publisher.join(120)
            report = drill.finish(deliver_timeout=60)
            # 2. The readers gone, bursts go on until the stalled client is cut: the
            # kernel's socket buffers between the worker, nginx and the client take
            # megabytes first. Bounded: at most 60 more bursts (15 MB).
            more = 0
            while sum(metric_by_replica(stack, streams, DROPPED).values()) == dropped_before and more < 60:
                batch = [{"channel": drill.channel, "data": {"n": more, "pad": "x" * pad}}] * 100
                assert stack.publish_raw(batch).status_code == 202
                more += 1
                time.sleep(0.5)
            wait_until(
                lambda: sum(metric_by_replica(stack, streams, DROPPED).values()) > dropped_before,
                30,
                f"the stalled client to be cut ({[stream_stats(stack, c) for c in streams]})",
                0.5,
            )
            memory = {c: s.stop() for c, s in samplers.items()}
        finally:
            slow.close()
            for sampler in samplers.values():
                sampler.close()
    drill.assert_exactly_once(report)
    assert report["acknowledged"] == 100 * bursts, report
    # Every reader kept its one connection: no burst cut it.
    assert report["reconnects"] == 0 and report["refused"] == {}, report
    assert all(s.connections == 1 and not s.ended_at for s in drill.pool.subscribers), report
    assert sum(metric_by_replica(stack, streams, DROPPED).values()) - dropped_before == 1
    growth = max(m["rss_peak"] - m["rss_before"] for m in memory.values())
    # The stalled client holds at most CLIENT_BUFFER_MAX_BYTES (4 MiB); the readers, what one
    # burst leaves queued for a moment.
    assert growth < 64 * MIB, (mib(growth), memory)
    stalled_mib = mib((bursts + more) * 100 * (pad + 100))
    measurements["bounded: burst to 50 readers + 1 stalled, latency ms p50/p99"] = report[
        "latency_ms_p50_p99"
    ]
    measurements["bounded: stalled client cut after MiB / workers' RSS growth MiB"] = (
        stalled_mib,
        mib(growth),
    )


class Resumer:
    """A client that resumes a stream from `last_id` and then reads nothing
    (a tiny receive buffer, so what is sent backs up towards the server)."""

    def __init__(self, host: str, channels: list[str], last_id: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect((host, 80))
        self.sock.sendall(stream_request(80, channels, last_id))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(256)
            assert chunk, f"the resumed stream ended at once: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head[:200]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def fill(stack: Stack, channels: list[str], per_channel: int, size: int) -> str:
    """Publish `per_channel` events of `size` bytes on each channel; the id before the first."""
    limit = int(stack.settings["MAX_BODY_BYTES"])
    events = [
        {"channel": c, "data": {"n": n, "pad": "x" * size}} for n in range(per_channel) for c in channels
    ]
    per_request = max(1, limit // (size + 200))
    first = None
    for i in range(0, len(events), per_request):
        deadline = time.monotonic() + 15
        while (answer := stack.publish_raw(events[i : i + per_request])).status_code == 429:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)  # nginx's publish rate limit: back off
        assert answer.status_code == 202, answer.text
        first = first or answer.json()["events"][0]["id"]
    assert first is not None
    epoch, seq = first.rsplit("-", 1)
    return f"{epoch}-{int(seq) - 1}"


def test_resumes_that_do_not_read_hold_a_page_each(
    stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    streams = stack.containers("stream-service")
    channels = [f"{channel}.{i}" for i in range(16)]
    per_channel = int(stack.settings.get("HISTORY_MAXLEN", "1000"))
    before_first = fill(stack, channels, per_channel, 4000)  # 16 channels full: ~64 MB of history
    gap_mib = mib(len(channels) * per_channel * 4100)
    nginx_ip = stack.container_ip(stack.containers("nginx")[0])
    buffer = int(stack.settings["CLIENT_BUFFER_BYTES"])
    raise_nofile(1024)
    samplers = {c: MemorySampler(c) for c in streams}
    resumers: list[Resumer] = []
    live = open_stream(stack.base_url, [channel + ".live"])
    try:
        for _ in range(50):
            resumers.append(Resumer(nginx_ip, channels, before_first))
        wait_until(
            lambda: sum(stream_stats(stack, c)["clients"] for c in streams) >= 51, 30, "51 streams open"
        )
        # The resumers have their first pages by now, and wait for them to drain.
        latencies = []
        for n in range(20):
            sent = time.monotonic()
            stack.publish(channel + ".live", {"n": n})
            live.wait_events(n + 1, timeout=5)
            latencies.append(time.monotonic() - sent)
        memory = {c: s.stop() for c, s in samplers.items()}
    finally:
        for sampler in samplers.values():
            sampler.close()
        live.close()
        for r in resumers:
            r.close()
    assert [json.loads(e.data)["n"] for e in live.events] == list(range(20))
    growth = sum(m["rss_peak"] - m["rss_before"] for m in memory.values())
    # Each resumer holds at most its queue (CLIENT_BUFFER_BYTES) and one page
    # (CLIENT_BUFFER_BYTES and one event), plus what a stream costs anyway (its
    # greenlet while it catches up); the worker as a whole, a fixed allowance
    # (Redis connections and replies, the allocator). Measured: 12.5-13.1 MiB.
    # The whole gap, 50 times over, would be 3 GB.
    bound = 50 * (2 * buffer + 4100 + 16 * 1024)
    assert growth < bound + 16 * MIB, (mib(growth), mib(bound), memory)
    assert max(latencies) < 0.2, latencies
    measurements["bounded: 50 non-reading resumes, gap MiB each / workers' RSS growth MiB"] = (
        gap_mib,
        mib(growth),
    )
    measurements["bounded: live stream beside them, publish-to-receive ms median/max"] = (
        round(statistics.median(latencies) * 1000, 1),
        round(max(latencies) * 1000, 1),
    )
