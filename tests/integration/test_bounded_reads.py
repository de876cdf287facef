"""Bounded work per request (issue 16): whatever its gap, a request makes Redis
read no more than the page it answers (plus a few entries of look-ahead per
channel), and a resuming stream reads its gap one page at a time.

What the read scripts ask of Redis is counted with MONITOR, which shows every
command a script runs with its arguments: for each XRANGE/XREVRANGE, its COUNT
is the most entries it could return.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from tests.conftest import post_events, stats
from tests.support.services import Service
from tests.support.sse_client import open_stream

CHANNELS = 16
PER_CHANNEL = 120
LOOKAHEAD = 8  # entries per channel a merge may read beyond the page (history.py)
RANGE = re.compile(r'"X(?:REV)?RANGE" .* "COUNT" "(\d+)"')


class Monitor(threading.Thread):
    """Counts, while running, the entries the read scripts ask Redis for."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.asked = 0  # sum of COUNT over XRANGE/XREVRANGE calls
        self.ranges = 0
        self.scripts = 0  # EVALSHA / EVAL calls
        self._monitor = self.client.monitor().__enter__()
        self._halt = threading.Event()

    def run(self) -> None:
        # Each command arrives as one reply; this connection is ours alone.
        conn = self._monitor.connection
        while not self._halt.is_set():
            if not conn.can_read(timeout=0.1):
                continue
            line = conn.read_response()
            text = line.decode(errors="replace") if isinstance(line, bytes) else str(line)
            if '"EVALSHA"' in text or '"EVAL"' in text:
                self.scripts += 1
            match = RANGE.search(text)
            if match:
                self.asked += int(match[1])
                self.ranges += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.client.close()

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until MONITOR's stream is quiet (what was sent is counted)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline and last != self.ranges:
            last = self.ranges
            time.sleep(0.2)


@pytest.fixture
def monitor(redis_url: str) -> Iterator[Callable[[], Monitor]]:
    made: list[Monitor] = []

    def start() -> Monitor:
        m = Monitor(redis_url)
        m.start()
        made.append(m)
        return m

    yield start
    for m in made:
        m.stop()


@pytest.fixture
def full_channels(publisher: Service, channel: str) -> tuple[list[str], str]:
    """16 channels with PER_CHANNEL events of ~4 KB each; the id before the first."""
    names = [f"{channel}.{i}" for i in range(CHANNELS)]
    first = None
    pad = "x" * 4000
    for n in range(PER_CHANNEL):
        batch = [{"channel": c, "data": {"n": n, "pad": pad}} for c in names]
        answer = post_events(publisher.url, batch)
        assert answer.status_code == 202, answer.text
        first = first or answer.json()["events"][0]["id"]
    assert first is not None
    epoch, seq = first.rsplit("-", 1)
    return names, f"{epoch}-{int(seq) - 1}"


def history(service: Service, channels: list[str], **params: Any) -> dict[str, Any]:
    query = [("channel", c) for c in channels] + list(params.items())
    answer = requests.get(f"{service.url}/history", params=query, timeout=10)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_history_reads_no_more_than_it_answers(
    stream: Service, full_channels: tuple[list[str], str], monitor: Callable[[], Monitor]
) -> None:
    names, before_first = full_channels
    m = monitor()
    body = history(stream, names, after=before_first, limit=1)
    m.settle()
    assert len(body["events"]) == 1 and body["reset"] is None
    # 16 channels of 120 events: a read of everything would ask for 1,920 entries.
    assert 0 < m.asked <= 1 + LOOKAHEAD * CHANNELS, m.asked
    m2 = monitor()
    recent = history(stream, names, limit=3)
    m2.settle()
    assert len(recent["events"]) == 3
    assert 0 < m2.asked <= 3 + LOOKAHEAD * CHANNELS, m2.asked


def test_a_history_page_holds_at_most_a_mebibyte_and_pages_on(
    stream: Service, full_channels: tuple[list[str], str]
) -> None:
    names, before_first = full_channels
    seen: list[str] = []
    after = before_first
    pages = 0
    while True:
        body = history(stream, names, after=after, limit=1000)
        pages += 1
        data = [len(json.dumps(e["data"], separators=(",", ":"))) + len(e["event"]) for e in body["events"]]
        assert sum(data[:-1]) < 1 << 20  # the page stops at the event that reaches a MiB
        seen += [e["id"] for e in body["events"]]
        if not body["events"]:
            break
        after = body["last_id"]
        assert pages < 20
    # 1,920 events of ~4 KB (7.5 MB): several pages, every event exactly once, in order.
    assert pages >= 8
    assert len(seen) == len(set(seen)) == CHANNELS * PER_CHANNEL
    seqs = [int(i.rsplit("-", 1)[1]) for i in seen]
    assert seqs == sorted(seqs)


def test_a_resume_reads_its_gap_a_page_at_a_time(
    start: Callable[..., Service], full_channels: tuple[list[str], str], monitor: Callable[[], Monitor]
) -> None:
    names, before_first = full_channels
    service = start("stream", CLIENT_BUFFER_BYTES="65536")
    m = monitor()
    client = open_stream(service.url, names, last_event_id=before_first)
    try:
        events = client.wait_events(CHANNELS * PER_CHANNEL, timeout=60)
        seqs = [int(e.id.rsplit("-", 1)[1]) for e in events]
        assert seqs == sorted(set(seqs)) and len(seqs) == CHANNELS * PER_CHANNEL
        m.settle()
        # ~7.5 MB of gap, 115 times the buffer, read in pages of 64 KiB, each
        # once the last was written out: none of it all at once.
        assert m.scripts >= 100, m.scripts
        assert stats(service)["dropped_slow"] == 0
    finally:
        client.close()
