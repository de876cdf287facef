"""The Compose stack on a Redis Cluster (compose.cluster.yaml), for the e2e tests
that use it: its files, its nodes, and which master serves a channel."""

from __future__ import annotations

import zlib

from tests.e2e.support import Stack

FILES = ("compose.yaml", "compose.cluster.yaml")
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")
PARTITIONS = 16  # CLUSTER_PARTITIONS' default


def cli(stack: Stack, node: str, *args: str) -> str:
    """redis-cli in the node's container."""
    return stack.docker("exec", stack.containers(node)[0], "redis-cli", *args)


def master_of(stack: Stack, channel: str) -> str:
    """The node (service name) that serves the channel's partition: the master
    holding keys of its slot (the channel has been published to)."""
    key = f"herald:{{p{zlib.crc32(channel.encode()) % PARTITIONS}}}:meta"
    slot = cli(stack, "redis", "CLUSTER", "KEYSLOT", key).strip()
    for node in NODES:
        try:
            if cli(stack, node, "ROLE").split()[0] != "master":
                continue
            if int(cli(stack, node, "CLUSTER", "COUNTKEYSINSLOT", slot)) > 0:
                return node
        except (AssertionError, IndexError, ValueError):
            continue  # a node that is down
    raise AssertionError(f"no master serves slot {slot}")
