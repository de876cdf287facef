"""Lifecycle webhooks on the Compose stack over a Redis Cluster
(compose.yaml + compose.cluster.yaml + the e2e receiver): channels whose
partitions are on three different masters each get their occupied/vacated
pair, a reload within the delay sends nothing, and no script crosses slots.

A stack of its own: test_cluster_stack.py's master-kill drill runs on the
cluster as it was before webhooks (see docs/benchmark.md, "Webhooks", on what a
failover costs the publisher)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import FILES
from tests.e2e.conftest import running_stack
from tests.e2e.support import Stack
from tests.e2e.test_cluster_stack import on_distinct_masters
from tests.e2e.webhooks import RECEIVER_FILE, Hooks, subscribe, visit, wait_kinds, webhook_settings


@pytest.fixture(scope="module")
def receiver_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-webhook-receiver")


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory, receiver_dir: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("herald-cluster-webhooks")
    with running_stack(workdir, webhook_settings(receiver_dir), files=(*FILES, RECEIVER_FILE)) as stack:
        yield stack


def test_webhooks_of_channels_on_every_master(cluster_stack: Stack, receiver_dir: Path) -> None:
    """Each master's channels get their occupied/vacated pair (a reload within the
    delay sends nothing), and no script crossed slots."""
    stack, hooks = cluster_stack, Hooks(receiver_dir)
    channels = on_distinct_masters(stack, 3)
    opened = [subscribe(stack, c) for c in channels]
    time.sleep(1.5)
    opened[0].close()
    opened[0] = subscribe(stack, channels[0])  # a reload
    time.sleep(1.5)
    for response in opened:
        response.close()
    for c in channels:
        wait_kinds(hooks, c, ["occupied", "vacated"])
    for c in channels:
        visit(stack, c)
        wait_kinds(hooks, c, ["occupied", "vacated"] * 2)
    logs = stack.compose("logs", "--no-color", "stream-service", "webhook-dispatcher", timeout=60).stdout
    assert "CROSSSLOT" not in logs and "Traceback" not in logs
