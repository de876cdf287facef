"""The Redis Cluster the suite runs Herald on (issue 10): its shape, sharded
Pub/Sub, and a failover, checked on the real thing before Herald relies on them."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.support.cluster import Cluster


@pytest.fixture
def cluster(redis_cluster: Cluster) -> Cluster:
    """The session's cluster, whole."""
    redis_cluster.wait_healthy(timeout=60)
    return redis_cluster


def test_three_masters_each_with_a_replica(cluster: Cluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and len(cluster.replicas()) == 3
    # Every master has one replica following it.
    followed = [n["master_id"] for n in cluster.nodes().values() if "slave" in n["flags"]]
    ids = {n["node_id"] for n in cluster.nodes().values() if "master" in n["flags"]}
    assert sorted(followed) == sorted(ids)


def test_sharded_pubsub_reaches_a_subscriber_of_the_owning_shard(cluster: Cluster) -> None:
    client = cluster.client()
    channel = f"herald:{{p7}}:live:{uuid.uuid4().hex}"
    pubsub = client.pubsub()
    pubsub.ssubscribe(channel)
    deadline = time.monotonic() + 5
    confirmed = None
    while confirmed is None and time.monotonic() < deadline:
        confirmed = pubsub.get_sharded_message(timeout=0.5)
    assert confirmed is not None and confirmed["type"] == "ssubscribe"
    assert client.spublish(channel, "hello") == 1
    message = None
    while message is None and time.monotonic() < deadline:
        message = pubsub.get_sharded_message(timeout=0.5)
    assert message is not None and message["type"] == "smessage" and message["data"] == b"hello"
    pubsub.close()
    client.close()


def test_a_killed_master_is_replaced_by_its_replica(cluster: Cluster) -> None:
    client = cluster.client()
    key = "herald:{p3}:meta"
    client.hset(key, "seq", 41)
    owner = client.get_node_from_key(key)
    assert owner is not None and owner.port in cluster.masters()
    cluster.kill(owner.port)
    try:
        cluster.wait_healthy(masters=3, replicas=2, timeout=30)
        assert owner.port not in cluster.masters() and len(cluster.masters()) == 3
        # The promoted replica serves the slot; what was replicated before the kill is there.
        assert int(cluster.client().hincrby(key, "seq", 1)) == 42
    finally:
        cluster.revive(owner.port)
        cluster.wait_healthy(timeout=60)
    # Started again, the node rejoined as a replica of the one that took over.
    assert owner.port in cluster.replicas()
