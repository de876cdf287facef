"""The Compose stack on a Redis Cluster (compose.yaml + compose.cluster.yaml):
the same API on the same port, through nginx, with streams over partitions on
different masters resuming exactly, and a master killed while publishing.
(The webhooks on a cluster: test_cluster_webhooks.py.)"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.cluster import FILES, cli, master_of
from tests.e2e.conftest import running_stack
from tests.e2e.support import ResumingClient, Stack, iter_frames, until_live, wait_until


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("herald-cluster"), files=FILES) as stack:
        yield stack


def on_distinct_masters(stack: Stack, count: int) -> list[str]:
    """New channels, each served by another master."""
    prefix = uuid.uuid4().hex[:8]
    found: dict[str, str] = {}
    for i in range(200):
        name = f"e2e.{prefix}.{i}"
        stack.publish(name, "warm-up")  # so the slot holds a key to find its master by
        found.setdefault(master_of(stack, name), name)
        if len(found) == count:
            return list(found.values())
    raise AssertionError("could not place channels on distinct masters")


def test_the_cluster_variant_serves_the_same_api_through_nginx(cluster_stack: Stack) -> None:
    stack = cluster_stack
    assert "cluster_state:ok" in cli(stack, "redis", "CLUSTER", "INFO")
    channels = on_distinct_masters(stack, 3)
    response = stack.open_stream(channels)
    frames = iter_frames(response, timeout=30)
    until_live(frames)
    # A batch over three partitions on three masters, in one request.
    sent = [(c, n) for n in range(3) for c in channels]
    batch = [{"channel": c, "event": "m", "data": {"c": c, "n": n}} for c, n in sent]
    answer = stack.publish_raw(batch)
    assert answer.status_code == 202, answer.text
    got = []
    last = ""
    for frame in frames:
        if frame.event is not None and frame.event.event == "m":
            got.append(json.loads(frame.event.data))
            last = frame.event.id
            if len(got) == len(batch):
                break
    response.close()
    assert sorted((g["c"], g["n"]) for g in got) == sorted(sent)
    assert last.count("_") == 2  # a vector id: its position on each of three partitions
    # Missed while away, resumed through nginx with the vector in Last-Event-ID.
    for n in range(3, 6):
        for c in channels:
            stack.publish(c, {"c": c, "n": n}, event="m")
    client = ResumingClient(stack, channels, last, expected=9, deadline=time.monotonic() + 30)
    client.run()
    assert sorted((json.loads(e.data)["c"], json.loads(e.data)["n"]) for e in client.events) == sorted(
        (c, n) for n in range(3, 6) for c in channels
    )


def test_a_master_killed_while_publishing_through_the_stack(cluster_stack: Stack) -> None:
    stack = cluster_stack
    channels = on_distinct_masters(stack, 2)
    victim = master_of(stack, channels[0])
    total = 120
    # Each client starts from the position the warm-up left (one id per partition).
    start = stack.open_stream(channels)
    position = next(f.fields["id"] for f in iter_frames(start, timeout=15) if "id" in f.fields)
    start.close()
    clients = [
        ResumingClient(
            stack, channels, position, expected=total, deadline=time.monotonic() + 90, name="both"
        ),
        ResumingClient(
            stack, channels[:1], "", expected=total // 2, deadline=time.monotonic() + 90, name="one"
        ),
    ]
    for client in clients:
        client.start()
        assert client.connected.wait(15)
    acked: list[tuple[str, int]] = []
    refused = 0
    for n in range(total):
        channel = channels[n % 2]
        if n == 30:
            stack.docker("kill", stack.containers(victim)[0])
        deadline = time.monotonic() + 30
        while True:
            answer = stack.publish_raw({"channel": channel, "event": "m", "data": {"c": channel, "n": n}})
            if answer.status_code == 202:
                acked.append((channel, n))
                break
            assert answer.status_code in (429, 502, 503), answer.text  # never a 500
            refused += 1
            assert time.monotonic() < deadline, "publishing did not recover after the failover"
            time.sleep(0.2)
        time.sleep(0.01)
    wait_until(lambda: all(c.done() for c in clients), 60, "every event delivered")
    for client in clients:
        client.stop()
        got = [(json.loads(e.data)["c"], json.loads(e.data)["n"]) for e in client.events if e.event == "m"]
        assert len(got) == len(set(got)), "duplicates"
        for channel in channels:
            ns = [n for c, n in got if c == channel]
            assert ns == sorted(ns)
        missing = {(c, n) for c, n in acked if c in client.channels} - set(got)
        reset = any(e.event == "reset" for e in client.events)
        assert not missing or reset, f"{client.name}: {len(missing)} lost silently"
    stack.compose("start", victim)  # it rejoins as a replica
