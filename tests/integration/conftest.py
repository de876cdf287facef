"""Fixtures for tests that run on both deployments: one Redis server, and a
Redis Cluster (3 masters + 3 replicas) with PARTITIONS=16."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import post_events
from tests.support import keys
from tests.support.cluster import Cluster
from tests.support.services import Service, start_service

CLUSTER_PARTITIONS = 16


@dataclass
class Deployment:
    """Herald on one kind of Redis: its services, and the Redis node of each partition."""

    kind: str
    partitions: int
    stream: Service
    publisher: Service
    node: Callable[[str], redis.Redis]  # a client of the node holding a channel's partition
    env: dict[str, str]  # what a service needs to run on this deployment
    redis_url: str
    started: list[Service] = field(default_factory=list)

    def meta_key(self, channel: str) -> str:
        return keys.meta_key(channel, self.partitions)

    def publish(self, channel: str, data: Any, event: str | None = None) -> str:
        """Publish one event through the deployment's publisher; return its id."""
        body: dict[str, Any] = {"channel": channel, "data": data}
        if event:
            body["event"] = event
        answer = post_events(self.publisher.url, body)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def same_partition(self, channel: str, count: int) -> list[str]:
        """`count` channel names that share one partition (so their ids are plain)."""
        return keys.channels_in_one_partition(channel, count, self.partitions)


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def deployment(request: pytest.FixtureRequest, logs_dir: Path) -> Iterator[Deployment]:
    """Each deployment in turn, with a stream service and a publisher on it."""
    if request.param == "standalone":
        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        stream, publisher = request.getfixturevalue("stream"), request.getfixturevalue("publisher")
        yield Deployment("standalone", 1, stream, publisher, lambda channel: client, {}, url)
        client.close()
        return
    cluster: Cluster = request.getfixturevalue("redis_cluster")
    cluster.wait_healthy(timeout=60)
    env = {"REDIS_MODE": "cluster", "PARTITIONS": str(CLUSTER_PARTITIONS)}
    stream = start_service(
        "stream", cluster.url, logs_dir, REDIS_MODE="cluster", PARTITIONS=env["PARTITIONS"]
    )
    publisher = start_service(
        "publisher", cluster.url, logs_dir, REDIS_MODE="cluster", PARTITIONS=env["PARTITIONS"]
    )
    clients: dict[int, redis.Redis] = {}

    def node(channel: str) -> redis.Redis:
        routing = cluster.client()
        try:
            slot = int(routing.keyslot(keys.meta_key(channel, CLUSTER_PARTITIONS)))
        finally:
            routing.close()
        port = cluster.owner(slot)
        return clients.setdefault(port, redis.Redis(host=cluster.host, port=port))

    try:
        yield Deployment("cluster", CLUSTER_PARTITIONS, stream, publisher, node, env, cluster.url)
    finally:
        stream.stop()
        publisher.stop()
        for c in clients.values():
            c.close()


@pytest.fixture
def start_on(deployment: Deployment, start: Callable[..., Service]) -> Callable[..., Service]:
    """Start a service with custom settings on the current deployment."""

    def _start(kind: str, **env: str) -> Service:
        return start(kind, redis_url_override=deployment.redis_url, **{**deployment.env, **env})

    return _start
