"""The publisher on a real Redis Cluster (REDIS_MODE=cluster, PARTITIONS=16).

Each partition's keys share a hash slot, so partitions spread over the
cluster's masters; a batch over several partitions runs one script per
partition, on the master that owns it. A partition whose slot moves is
followed (ASK during the migration, MOVED after it). A killed master must cost
no acknowledged event: publishes during the failover get a 503, and succeed
again once its replica has taken over. The tests run in this order (the last
one leaves the cluster without the killed master).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import post_events
from tests.integration.test_publisher import (
    ID_RE,
    data_text,
    epoch_of,
    seq_of,
    sharded_messages,
    subscribe_sharded,
)
from tests.support import keys
from tests.support.cluster import Cluster
from tests.support.services import Service, start_service

P = 16


@pytest.fixture(scope="module")
def cluster(redis_cluster: Cluster) -> Cluster:
    """The session's cluster, whole."""
    redis_cluster.wait_healthy(timeout=60)
    return redis_cluster


@pytest.fixture(scope="module")
def publisher(cluster: Cluster, logs_dir: Path) -> Iterator[Service]:
    service = start_service(
        "publisher", cluster.url, logs_dir, REDIS_MODE="cluster", PARTITIONS=str(P), RETRY_AFTER_SECONDS="1"
    )
    yield service
    service.stop()


def owner(client: Any, channel: str) -> int:
    """The port of the master that owns the channel's partition."""
    return int(client.get_node_from_key(keys.meta_key(channel, P)).port)


def one_channel_per_master(client: Any, prefix: str) -> dict[int, str]:
    """{master port: a channel whose partition that master owns}, for every master."""
    found: dict[int, str] = {}
    for name in keys.channels_in_distinct_partitions(prefix, P, P):
        found.setdefault(owner(client, name), name)
    return found


def history(client: Any, channel: str) -> list[tuple[int, dict[str, str]]]:
    raw: Any = client.xrange(keys.stream_key(channel, P))
    return [
        (int(entry_id.decode().split("-")[0]), {k.decode(): v.decode() for k, v in fields.items()})
        for entry_id, fields in raw
    ]


def test_events_are_stored_by_the_masters_owning_their_partitions(
    cluster: Cluster, publisher: Service
) -> None:
    client = cluster.client()
    by_master = one_channel_per_master(client, f"t.{uuid.uuid4().hex[:8]}")
    assert sorted(by_master) == cluster.masters()  # the batch below spans every master
    channels = list(by_master.values())
    # A client of each master (kept: a client that is collected closes its connections).
    nodes = [redis.Redis(host=cluster.host, port=owner(client, c), socket_timeout=5) for c in channels]
    subscribers = [node.pubsub() for node in nodes]
    try:
        for channel, pubsub in zip(channels, subscribers, strict=True):
            subscribe_sharded(pubsub, [keys.live_key(channel, P)])

        # Single events, one per partition.
        singles = []
        for channel in channels:
            answer = post_events(publisher.url, {"channel": channel, "event": "one", "data": {"c": channel}})
            assert answer.status_code == 202, answer.text
            singles.append(answer.json()["id"])
        # A batch over partitions on every master, twice per channel.
        batch = [{"channel": c, "data": [i, c]} for i in range(2) for c in channels]
        key = {"Idempotency-Key": uuid.uuid4().hex}
        answer = post_events(publisher.url, batch, headers=key)
        assert answer.status_code == 202, answer.text
        ids = [e["id"] for e in answer.json()["events"]]
        assert [e["channel"] for e in answer.json()["events"]] == [item["channel"] for item in batch]

        for channel, pubsub, single in zip(channels, subscribers, singles, strict=True):
            meta: Any = client.hmget(keys.meta_key(channel, P), "epoch", "partitions")
            assert meta[1] == str(P).encode()  # the meta hash records P
            epoch = meta[0].decode()
            mine = [
                (event_id, item)
                for event_id, item in zip(ids, batch, strict=True)
                if item["channel"] == channel
            ]
            # Ids of the channel's partition: its epoch, its counter.
            assert {epoch_of(single), *(epoch_of(i) for i, _ in mine)} == {epoch}
            seqs = [seq_of(single), *(seq_of(i) for i, _ in mine)]
            assert seqs == list(range(seqs[0], seqs[0] + 3))
            stored = history(client, channel)
            assert [s for s, _ in stored] == seqs
            assert [f["prev"] for _, f in stored] == ["0", str(seqs[0]), str(seqs[1])]
            assert [f["data"] for _, f in stored[1:]] == [data_text(item["data"]) for _, item in mine]
            # SPUBLISH reached a subscriber of the shard that owns the partition.
            live = sharded_messages(pubsub, 3)
            assert [text.split(" ", 3)[:2] for _, text in live] == [[epoch, str(s)] for s in seqs]
            assert {name for name, _ in live} == {keys.live_key(channel, P)}

        # The same request again: the same ids, stored once.
        again = post_events(publisher.url, batch, headers=key)
        assert again.status_code == 202 and again.json() == answer.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert all(len(history(client, c)) == 3 for c in channels)
        # And the same key with another request: 422.
        other = post_events(publisher.url, batch[::-1], headers=key)
        assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    finally:
        for pubsub, node in zip(subscribers, nodes, strict=True):
            pubsub.close()
            node.close()
        client.close()
    ready = requests.get(f"{publisher.url}/readyz", headers={"Connection": "close"}, timeout=5)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_expired_channels_leave_the_index_on_every_master(cluster: Cluster, logs_dir: Path) -> None:
    """The sweep reads and deletes keys of the partition's slot that the script
    was not given (the expired channels' streams): allowed on a cluster node, as
    they share the slot. (docs/redis-contract.md, "Expired channels".)"""
    service = start_service(
        "publisher", cluster.url, logs_dir, REDIS_MODE="cluster", PARTITIONS=str(P), HISTORY_TTL_SECONDS="1"
    )
    client = cluster.client()
    prefix = f"t.{uuid.uuid4().hex[:8]}"
    by_master = one_channel_per_master(client, prefix)
    metas = [keys.meta_key(c, P) for c in by_master.values()]
    forgotten_before = [client.hget(m, "forgotten") for m in metas]
    try:
        for channel in by_master.values():
            assert post_events(service.url, {"channel": channel, "data": 1}).status_code == 202
        gone = list(by_master.values())
        deadline = time.monotonic() + 10
        while any(client.exists(keys.stream_key(c, P)) for c in gone) and time.monotonic() < deadline:
            time.sleep(0.1)
        for channel in gone:
            # Another channel of the same partition publishes: the sweep runs there.
            other = next(
                name
                for name in (f"{channel}.{i}" for i in range(1000))
                if keys.partition(name, P) == keys.partition(channel, P)
            )
            assert post_events(service.url, {"channel": other, "data": 2}).status_code == 202
            assert not client.hexists(keys.channels_key(channel, P), channel)
            assert client.zscore(keys.expiries_key(channel, P), channel) is None
            assert client.zscore(keys.expiries_key(channel, P), other) is not None
    finally:
        # Leave the shared cluster's `forgotten` as it was (other tests expect `prev` 0
        # for a channel's first event).
        for meta, before in zip(metas, forgotten_before, strict=True):
            if before is None:
                client.hdel(meta, "forgotten")
            else:
                client.hset(meta, "forgotten", before)
        client.close()
        service.stop()
    assert "Traceback" not in service.log()


def test_a_partition_moved_to_another_master_is_followed(cluster: Cluster, publisher: Service) -> None:
    """ASK while its slot migrates, MOVED once it has: both are followed, no answer is a 503."""
    client = cluster.client()
    channel = f"t.{uuid.uuid4().hex[:8]}"
    slot = int(client.keyslot(keys.meta_key(channel, P)))
    source = owner(client, channel)
    target = next(port for port in cluster.masters() if port != source)
    nodes = {port: redis.Redis(host=cluster.host, port=port, socket_timeout=5) for port in cluster.masters()}
    ids = {port: cluster.node_id(port) for port in nodes}
    try:
        first = post_events(publisher.url, {"channel": channel, "data": "before"})
        assert first.status_code == 202, first.text
        # Migrate the slot, keys first: then the source answers ASK for the partition's keys.
        nodes[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        nodes[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        moving: Any = nodes[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert moving
        nodes[source].execute_command("MIGRATE", cluster.host, target, "", 0, 5000, "KEYS", *moving)
        during = post_events(publisher.url, {"channel": channel, "data": "during"})
        assert during.status_code == 202, during.text
        for node in nodes.values():  # as `redis-cli --cluster reshard` ends: on every master
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        # The publisher still maps the slot to the source, which now answers MOVED.
        after = post_events(publisher.url, {"channel": channel, "data": "after"})
        assert after.status_code == 202, after.text
        answered = [first.json()["id"], during.json()["id"], after.json()["id"]]
        assert len({epoch_of(i) for i in answered}) == 1
        seqs = [seq_of(i) for i in answered]
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert nodes[source].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        # The redirections did happen, and were followed.
        errors: Any = nodes[source].info("errorstats")
        assert errors["errorstat_ASK"]["count"] >= 1 and errors["errorstat_MOVED"]["count"] >= 1, errors
        assert nodes[target].info("commandstats")["cmdstat_asking"]["calls"] >= 1
        stored: Any = nodes[target].xrange(keys.stream_key(channel, P))
        assert [(e.decode(), f[b"data"].decode()) for e, f in stored] == [
            (f"{seq}-0", f'"{text}"') for seq, text in zip(seqs, ["before", "during", "after"], strict=True)
        ]
    finally:
        for node in nodes.values():
            node.close()
        client.close()


def test_a_killed_master_costs_no_acknowledged_event(cluster: Cluster, publisher: Service) -> None:
    client = cluster.client()
    by_master = one_channel_per_master(client, f"t.{uuid.uuid4().hex[:8]}")
    client.close()
    victim = sorted(by_master)[0]
    # The victim's partition last: while it is down, the others are stored first.
    channels = [by_master[port] for port in sorted(by_master) if port != victim] + [by_master[victim]]

    # Every request spans every master. Half of them carry an Idempotency-Key:
    # one that gets a 503 is sent again with its key until it gets a 202. The
    # others are sent once: what their answer names as stored must be stored
    # once, the rest not at all. Requests are sent one at a time, so none is
    # in flight when the master dies.
    bodies: dict[str, list[dict[str, Any]]] = {}
    outcome: dict[str, list[dict[str, str] | None]] = {}  # per request, per event: stored as
    keyed: set[str] = set()
    errors: list[str] = []

    def send(name: str) -> bool:
        headers = {"Idempotency-Key": name} if name in keyed else {}
        answer = post_events(publisher.url, bodies[name], headers=headers)
        assert answer.status_code in (202, 503), answer.text
        assert answer.headers["Content-Type"] == "application/json"
        body = answer.json()
        if answer.status_code == 202:
            outcome[name] = body["events"]
            return True
        assert answer.headers["Retry-After"] == "1"
        errors.append(body["error"])
        if body["error"] == "partially_stored":
            # The victim's partition was not stored; the others were, but for
            # those after the moment the cluster marked the victim failed: every
            # master then refuses writes (CLUSTERDOWN, cluster-require-full-coverage)
            # until its replica takes over. Whatever the answer names is checked below.
            stored = [e is not None for e in body["events"]]
            assert stored[-1] is False and any(stored[:-1]), body
            outcome[name] = body["events"]
        else:
            assert body["error"] == "redis_unavailable", body
            outcome[name] = [None] * len(channels)
        return False

    def publish_new(n: int) -> bool:
        name = uuid.uuid4().hex
        bodies[name] = [{"channel": c, "data": {"n": n, "request": name}} for c in channels]
        if n % 2:
            keyed.add(name)
        return send(name)

    for n in range(10):
        assert publish_new(n)
    cluster.kill(victim)
    try:
        deadline = time.monotonic() + 30
        n, succeeded_in_a_row = 10, 0
        while succeeded_in_a_row < 3 or not errors:
            assert time.monotonic() < deadline, (
                f"publishing did not recover after the failover: {errors[-3:]}"
            )
            succeeded_in_a_row = succeeded_in_a_row + 1 if publish_new(n) else 0
            n += 1
            time.sleep(0.02)
        # Never a 500: a 503 while the slot's master was gone; with a key, a clean one.
        assert {"partially_stored", "redis_unavailable"} <= set(errors), errors
        cluster.wait_healthy(masters=3, replicas=2, timeout=30)
        for name in keyed:
            if not all(outcome[name]):
                stored_before = outcome[name]
                assert send(name), name
                # Sent again: what was stored keeps its id, the rest is stored now.
                assert all(e is None or e == outcome[name][i] for i, e in enumerate(stored_before))

        client = cluster.client()
        try:
            for position, channel in enumerate(channels):
                stored = history(client, channel)
                data = [f["data"] for _, f in stored]
                assert len(data) == len(set(data)), "an event was stored twice"
                by_seq = dict(stored)
                expected = {name: events[position] for name, events in outcome.items() if events[position]}
                assert len(stored) == len(expected), "history holds events no answer named as stored"
                for name, event in expected.items():
                    assert event is not None
                    assert ID_RE.fullmatch(event["id"]) and event["channel"] == channel
                    # Stored as answered: this id, this data.
                    assert by_seq[seq_of(event["id"])]["data"] == data_text(bodies[name][position]["data"])
        finally:
            client.close()
    finally:
        # The session's cluster, whole again: the node rejoins as a replica.
        cluster.revive(victim)
        cluster.wait_healthy(timeout=60)
    assert "Traceback" not in publisher.log() and "unexpected error" not in publisher.log()
