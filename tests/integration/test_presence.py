"""Presence: `GET /channels/<channel>` counts the streams subscribed to a channel
over every stream replica, follows changes within seconds, forgets a replica
that died without cleaning up, and costs no Redis write per client."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.services import Service, eventually
from tests.support.sse_client import open_stream

TTL = "3"  # PRESENCE_TTL_SECONDS, the shortest allowed


def subscribers(publisher: Service, channel: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{publisher.url}/channels/{channel}", headers=headers, timeout=5)


def count(publisher: Service, channel: str) -> int:
    answer = subscribers(publisher, channel)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["channel"] == channel
    return int(body["subscribers"])


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    """A Redis of this module's own, so that its command counters are ours alone."""
    require_docker("the presence tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


def test_streams_on_two_replicas_are_counted_and_follow_changes(
    start: Callable[..., Service], publisher: Service, channel: str
) -> None:
    a = start("stream", PRESENCE_TTL_SECONDS=TTL)
    b = start("stream", PRESENCE_TTL_SECONDS=TTL)
    assert count(publisher, channel) == 0
    on_a = [open_stream(a.url, [channel]) for _ in range(3)]
    on_b = [open_stream(b.url, [channel, channel + ".other"]) for _ in range(2)]
    try:
        assert eventually(lambda: count(publisher, channel) == 5, timeout=5)
        assert eventually(lambda: count(publisher, channel + ".other") == 2, timeout=5)
        for client in on_a[:2]:
            client.close()
        assert eventually(lambda: count(publisher, channel) == 3, timeout=5)
    finally:
        for client in on_a + on_b:
            client.close()
    assert eventually(lambda: count(publisher, channel) == 0, timeout=5)


def test_a_replica_killed_without_cleaning_up_stops_counting_after_the_ttl(
    start: Callable[..., Service], publisher: Service, channel: str
) -> None:
    alive = start("stream", PRESENCE_TTL_SECONDS=TTL)
    doomed = start("stream", PRESENCE_TTL_SECONDS=TTL)
    kept = open_stream(alive.url, [channel])
    lost = [open_stream(doomed.url, [channel]) for _ in range(4)]
    try:
        assert eventually(lambda: count(publisher, channel) == 5, timeout=5)
        workers = doomed.worker_pids()
        doomed.process.send_signal(signal.SIGKILL)  # the arbiter first: no new worker
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        # No goodbye was written: the 4 lapse at their deadline, the live one stays.
        assert count(publisher, channel) == 5
        assert eventually(lambda: count(publisher, channel) == 1, timeout=float(TTL) + 3)
    finally:
        kept.close()
        for client in lost:
            client.close()


def test_presence_costs_no_redis_write_per_client(start: Callable[..., Service], own_redis: str) -> None:
    db = redis.Redis.from_url(own_redis)
    stream = start("stream", redis_url_override=own_redis, PRESENCE_TTL_SECONDS="30")
    pub = start("publisher", redis_url_override=own_redis)
    db.config_resetstat()
    clients = [open_stream(stream.url, ["crowd"]) for _ in range(100)]
    try:
        assert eventually(lambda: count(pub, "crowd") == 100, timeout=5)
        calls = db.info("commandstats").get("cmdstat_hset", {}).get("calls", 0)
        # 100 streams opened over a few seconds: one write per changed second, not one per stream.
        assert 1 <= calls <= 15, calls
    finally:
        for client in clients:
            client.close()
    assert eventually(lambda: count(pub, "crowd") == 0, timeout=5)


def test_presence_needs_the_publish_token_and_a_valid_channel(start: Callable[..., Service]) -> None:
    pub = start("publisher", PUBLISH_TOKEN="presence-secret")
    answer = subscribers(pub, "orders")
    assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    answer = subscribers(pub, "orders", token="presence-secret")
    assert answer.status_code == 200 and answer.json() == {"channel": "orders", "subscribers": 0}
    bad = subscribers(pub, "no%20spaces", token="presence-secret")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_channel"
    post = requests.post(f"{pub.url}/channels/orders", timeout=5)
    assert post.status_code == 405 and post.json()["error"] == "method_not_allowed"
