"""PUBLISH_WAIT_REPLICAS: a 202 only once enough replicas hold the events.

Redis replicates asynchronously: without waiting, a failover can promote a
replica that lacks events already acknowledged. With the setting, the publisher
sends WAIT after its script, and answers 503 `not_replicated` (with the ids)
when too few replicas confirm in time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.conftest import post_events
from tests.support import keys
from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.services import Service


class Replica:
    """A Redis replica of the suite's Redis, in its own container."""

    def __init__(self, container: Any, host: str) -> None:
        self.container = container
        self.host = host
        self.client = redis.Redis(host=host, port=6379, socket_timeout=2)

    def linked(self) -> bool:
        return self.client.info("replication").get("master_link_status") == "up"

    def wait_linked(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not self.linked():
            assert time.monotonic() < deadline, "the replica did not sync in time"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def primary() -> Iterator[tuple[str, str]]:
    """A Redis of its own for this module: (URL from the host, address on Docker's network)."""
    require_docker("the replication tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        yield url, wrapped.attrs["NetworkSettings"]["IPAddress"]


@pytest.fixture(scope="module")
def replica(primary: tuple[str, str]) -> Iterator[Replica]:
    from testcontainers.core.container import DockerContainer

    command = [
        "redis-server",
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--replicaof",
        primary[1],
        "6379",
    ]
    with DockerContainer(REDIS_IMAGE).with_command(command) as container:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        running = Replica(container, wrapped.attrs["NetworkSettings"]["IPAddress"])
        running.wait_linked()
        yield running


def stored(client: redis.Redis, channel: str, partitions: int = 1) -> list[str]:
    """The sequence numbers in the channel's history on this server."""
    entries: Any = client.xrange(keys.stream_key(channel, partitions))
    return [entry_id.decode().split("-")[0] for entry_id, _ in entries]


def seqs(answer: dict[str, Any]) -> list[str]:
    return [e["id"].split("-")[1] for e in answer["events"]]


def test_a_202_means_the_replica_holds_the_events(
    start: Callable[..., Service], primary: tuple[str, str], replica: Replica, channel: str
) -> None:
    publisher = start("publisher", redis_url_override=primary[0], PUBLISH_WAIT_REPLICAS="1")
    answer = post_events(publisher.url, [{"channel": channel, "data": i} for i in range(20)])
    assert answer.status_code == 202, answer.text
    # Read from the replica at once: WAIT made the 202 wait for it.
    assert stored(replica.client, channel) == seqs(answer.json())


def test_a_replica_that_does_not_confirm_gets_503_and_a_retry_confirms(
    start: Callable[..., Service], primary: tuple[str, str], replica: Replica, channel: str
) -> None:
    publisher = start(
        "publisher",
        redis_url_override=primary[0],
        PUBLISH_WAIT_REPLICAS="1",
        PUBLISH_WAIT_TIMEOUT_SECONDS="0.3",
    )
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = [{"channel": channel, "data": "a"}, {"channel": channel, "data": "b"}]
    replica.container.get_wrapped_container().pause()
    try:
        began = time.monotonic()
        answer = post_events(publisher.url, body, headers=key)
        assert answer.status_code == 503, answer.text
        assert 0.3 <= time.monotonic() - began < 2
        failed = answer.json()
        assert failed["error"] == "not_replicated" and "0 of 1 replicas" in failed["message"]
        assert answer.headers["Retry-After"]
        # Stored on the primary (subscribers may have it): the ids say which.
        assert stored(redis.Redis.from_url(primary[0]), channel) == seqs(failed)
    finally:
        replica.container.get_wrapped_container().unpause()
    replica.wait_linked()
    again = post_events(publisher.url, body, headers=key)
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["events"] == failed["events"]
    assert stored(replica.client, channel) == seqs(failed)


def test_waiting_for_more_replicas_than_there_are_never_answers_202(
    start: Callable[..., Service], primary: tuple[str, str], replica: Replica, channel: str
) -> None:
    publisher = start(
        "publisher",
        redis_url_override=primary[0],
        PUBLISH_WAIT_REPLICAS="2",
        PUBLISH_WAIT_TIMEOUT_SECONDS="0.2",
    )
    answer = post_events(publisher.url, {"channel": channel, "data": 1})
    assert answer.status_code == 503 and answer.json()["error"] == "not_replicated"
    assert "1 of 2 replicas" in answer.json()["message"]


def test_waiting_covers_every_partition_of_a_batch(
    start: Callable[..., Service], primary: tuple[str, str], replica: Replica, channel: str
) -> None:
    # Database 1: database 0 holds data written with PARTITIONS=1 (replication covers both).
    url = primary[0].rsplit("/", 1)[0] + "/1"
    publisher = start(
        "publisher",
        redis_url_override=url,
        PARTITIONS="4",
        PUBLISH_WAIT_REPLICAS="1",
        PUBLISH_WAIT_TIMEOUT_SECONDS="0.3",
    )
    names = keys.channels_in_distinct_partitions(channel, 3, 4)
    body = [{"channel": name, "data": i} for i in range(2) for name in names]
    on_replica = redis.Redis(host=replica.host, port=6379, db=1, socket_timeout=2)

    def by_channel(answer: dict[str, Any]) -> dict[str, list[str]]:
        return {n: [e["id"].split("-")[1] for e in answer["events"] if e["channel"] == n] for n in names}

    answer = post_events(publisher.url, body)
    assert answer.status_code == 202, answer.text
    # At once on the replica, in every partition.
    for name, seqs_of_name in by_channel(answer.json()).items():
        assert stored(on_replica, name, 4) == seqs_of_name

    key = {"Idempotency-Key": uuid.uuid4().hex}
    replica.container.get_wrapped_container().pause()
    try:
        began = time.monotonic()
        failed = post_events(publisher.url, body, headers=key)
        # One WAIT per server, not per partition.
        assert failed.status_code == 503 and time.monotonic() - began < 2, failed.text
        assert failed.json()["error"] == "not_replicated"
        # Every event of the batch was stored on the primary before the answer.
        on_primary = redis.Redis.from_url(url)
        for name, seqs_of_name in by_channel(failed.json()).items():
            assert stored(on_primary, name, 4)[-2:] == seqs_of_name
    finally:
        replica.container.get_wrapped_container().unpause()
    replica.wait_linked()
    again = post_events(publisher.url, body, headers=key)
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == {"events": failed.json()["events"]}
