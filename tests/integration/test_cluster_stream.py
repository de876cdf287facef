"""Herald on a real Redis Cluster (3 masters + 3 replicas): delivery, exact
resume over partitions on different masters, and the drills of issue 10: a
master killed while publishing, and the slot of a busy channel migrated while
publishing. The checker proves that every acknowledged event reached every
subscriber exactly once and in order per channel, or that an explicit `reset`
told it otherwise.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import redis
import requests

from tests.conftest import post_events
from tests.support import keys
from tests.support.cluster import Cluster
from tests.support.services import Service
from tests.support.sse_client import SSEClient, open_stream

PARTITIONS = 16


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Cluster:
    """The session's cluster, whole."""
    redis_cluster.wait_healthy(timeout=60)
    return redis_cluster


@pytest.fixture
def on_cluster(cluster: Cluster, start: Callable[..., Service]) -> Callable[..., Service]:
    """Start a service of the cluster deployment (every test leaves the cluster whole)."""
    cluster.wait_healthy(timeout=60)

    def _start(kind: str, **env: str) -> Service:
        settings = {"REDIS_MODE": "cluster", "PARTITIONS": str(PARTITIONS), "HEARTBEAT_SECONDS": "1"}
        return start(kind, redis_url_override=cluster.url, **{**settings, **env})

    return _start


def slot_of(cluster: Cluster, channel: str) -> int:
    client = cluster.client()
    try:
        return int(client.keyslot(keys.meta_key(channel, PARTITIONS)))
    finally:
        client.close()


def channels_on_each_master(cluster: Cluster) -> list[str]:
    """One new channel per master of the cluster (so, each in another partition)."""
    prefix = uuid.uuid4().hex[:8]
    found: dict[int, str] = {}
    for i in range(1000):
        name = f"c.{prefix}.{i}"
        found.setdefault(cluster.owner(slot_of(cluster, name)), name)
        if len(found) == len(cluster.masters()):
            return list(found.values())
    raise AssertionError("could not place a channel on every master")


def publish(pub: Service, channel: str, n: int) -> requests.Response:
    return post_events(pub.url, {"channel": channel, "data": {"c": channel, "n": n}})


def received(client: SSEClient) -> list[tuple[str, int]]:
    """(channel, n) of every message event the client got, in arrival order."""
    out = []
    for e in client.events:
        if e.event == "message":
            data = json.loads(e.data)
            out.append((data["c"], data["n"]))
    return out


def resets(client: SSEClient) -> list[str]:
    return [json.loads(e.data)["reason"] for e in client.events if e.event == "reset"]


@dataclass
class Load:
    """Publishes to `channels` in turn from a thread; records what was acknowledged."""

    pub: Service
    channels: list[str]
    acked: dict[str, list[int]] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # status -> count (never 500)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        n = 0
        deadline = time.monotonic() + 60  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            channel = self.channels[n % len(self.channels)]
            n += 1
            try:
                answer = publish(self.pub, channel, n)
            except requests.RequestException:
                self.refused[0] = self.refused.get(0, 0) + 1
                continue
            if answer.status_code == 202:
                self.acked.setdefault(channel, []).append(n)
            else:
                self.refused[answer.status_code] = self.refused.get(answer.status_code, 0) + 1
                time.sleep(0.05)
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)


def check_exactly_once(clients: list[tuple[SSEClient, list[str]]], load: Load, timeout: float = 30) -> None:
    """Every acknowledged event reached each subscriber of its channel exactly
    once, in publish order per channel, unless a reset said otherwise."""
    for client, channels in clients:
        wanted = {(c, n) for c in channels for n in load.acked.get(c, [])}

        def settled(c: SSEClient = client, w: set[tuple[str, int]] = wanted) -> bool:
            return w <= set(received(c)) or bool(resets(c))

        client.wait_for(settled, timeout)
        got = received(client)
        assert len(got) == len(set(got)), f"duplicates: {len(got) - len(set(got))}"
        for channel in channels:
            ns = [n for c, n in got if c == channel]
            assert ns == sorted(ns), f"{channel} out of order"
        missing = wanted - set(got)
        if missing:
            assert resets(client), f"{len(missing)} acknowledged events missing and no reset"
    assert 500 not in load.refused, load.refused


def test_a_stream_over_three_masters_gets_every_event_and_resumes_exactly(
    cluster: Cluster, on_cluster: Callable[..., Service]
) -> None:
    channels = channels_on_each_master(cluster)
    pub, sse = on_cluster("publisher"), on_cluster("stream")
    client = open_stream(sse.url, channels)
    single = open_stream(sse.url, channels[:1])
    try:
        assert client.status == 200 and single.status == 200
        for n in range(30):
            assert publish(pub, channels[n % 3], n).status_code == 202
        client.wait_events(30)
        single.wait_events(10)
        assert sorted(received(client)) == sorted((channels[n % 3], n) for n in range(30))
        assert received(single) == [(channels[0], n) for n in range(0, 30, 3)]
        # A stream over three partitions carries its position in each; a single
        # channel's stream keeps the plain id.
        assert client.last_id.count("_") == 2
        assert "_" not in single.last_id and "." not in single.last_id
        last = client.last_id
    finally:
        client.close()
        single.close()
    for n in range(30, 45):
        assert publish(pub, channels[n % 3], n).status_code == 202
    resumed = open_stream(sse.url, channels, last_event_id=last)
    try:
        resumed.wait_events(15)
        assert sorted(received(resumed)) == sorted((channels[n % 3], n) for n in range(30, 45))
        assert resets(resumed) == []
    finally:
        resumed.close()


def test_a_master_killed_while_publishing_loses_no_acknowledged_event_silently(
    cluster: Cluster, on_cluster: Callable[..., Service]
) -> None:
    channels = channels_on_each_master(cluster)
    pub, sse = on_cluster("publisher"), on_cluster("stream")
    subscribers = [
        (open_stream(sse.url, channels), channels),
        (open_stream(sse.url, channels[:1]), channels[:1]),
        (open_stream(sse.url, channels[1:]), channels[1:]),
    ]
    victim = cluster.owner(slot_of(cluster, channels[0]))
    load = Load(pub, channels).start()
    try:
        time.sleep(1)
        cluster.kill(victim)
        cluster.wait_healthy(masters=3, replicas=2, timeout=30)
        time.sleep(1.5)  # and on, on the promoted replica
        load.finish()
        assert sum(len(v) for v in load.acked.values()) > 50
        check_exactly_once(subscribers, load)
        assert victim not in cluster.masters()
    finally:
        load.finish()
        for client, _ in subscribers:
            client.close()
        cluster.revive(victim)
        cluster.wait_healthy(timeout=60)


def test_the_slot_of_a_busy_channel_migrated_while_publishing_loses_and_repeats_nothing(
    cluster: Cluster, on_cluster: Callable[..., Service]
) -> None:
    channels = channels_on_each_master(cluster)
    busy = channels[0]
    slot = slot_of(cluster, busy)
    pub, sse = on_cluster("publisher"), on_cluster("stream")
    subscribers = [(open_stream(sse.url, channels), channels), (open_stream(sse.url, [busy]), [busy])]
    load = Load(pub, [busy, busy, busy, channels[1]]).start()
    try:
        time.sleep(1)
        source = cluster.owner(slot)
        target = next(p for p in cluster.masters() if p != source)
        moved = cluster.migrate(slot, target)
        assert moved >= 3 and cluster.owner(slot) == target  # meta, channels, the stream...
        time.sleep(1.5)
        load.finish()
        check_exactly_once(subscribers, load)
        for client, _ in subscribers:
            assert resets(client) == []  # a migration loses nothing: no reason to reset
        # The stream service follows: its subscription now lives on the new owner.
        owner = redis.Redis(host=cluster.host, port=target)
        try:
            count = owner.execute_command("PUBSUB", "SHARDNUMSUB", keys.live_key(busy, PARTITIONS))
            assert int(count[1]) == 1
        finally:
            owner.close()
    finally:
        load.finish()
        for client, _ in subscribers:
            client.close()
