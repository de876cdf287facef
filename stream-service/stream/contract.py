# Twins: Script() in stream-service/stream/contract.py
# and publisher-service/dispatcher/contract.py is the same class:
# change both together (tests/unit/test_conventions.py checks it).
"""The stream service's side of the Redis contract (docs/redis-contract.md):
how a channel maps to its partition, every key the service names, and how its
Lua scripts run.

Every key of partition `p` starts with its hash tag, `herald:{p<p>}`, so all of
a partition's keys share one slot on a cluster. The scripts themselves stay
with the code that runs them (history.py reads, presence.py writes counts);
tests/integration/test_contract.py checks these names against the document's
spelling (tests/support/keys.py).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError


def partition_of(channel: str, partitions: int) -> int:
    """The channel's partition: CRC-32 of its name, modulo the partition count."""
    return zlib.crc32(channel.encode()) % partitions


def tag(partition: int) -> str:
    """The hash tag prefix of every key of `partition`."""
    return f"herald:{{p{partition}}}"


def meta_key(partition: int) -> str:
    """The partition's meta hash: epoch, seq, partitions, forgotten."""
    return f"{tag(partition)}:meta"


def channels_key(partition: int) -> str:
    """The partition's channel index: each channel's newest seq."""
    return f"{tag(partition)}:channels"


def stream_key(channel: str, partition: int) -> str:
    """The channel's history, a Redis stream with entry ids `<seq>-0`."""
    return f"{tag(partition)}:stream:{channel}"


def live_key(channel: str, partition: int) -> bytes:
    """The sharded Pub/Sub channel that carries `channel`'s events."""
    return f"{tag(partition)}:live:{channel}".encode()


def presence_key(channel: str, partition: int) -> str:
    """The channel's presence hash: one field per worker with streams on it."""
    return f"{tag(partition)}:presence:{channel}"


def partition_in_key(key: bytes) -> int:
    """The partition number in a key's hash tag; ValueError if it has none."""
    return int(key[key.index(b"{p") + 2 : key.index(b"}")])


class Script:
    """A Lua script, run by its SHA1 (EVALSHA), and sent whole (EVAL) the first
    time a node lacks it: one round trip either way."""

    __slots__ = ("lua", "sha")

    def __init__(self, lua: str) -> None:
        self.lua = lua
        self.sha = hashlib.sha1(lua.encode()).hexdigest()

    def run(self, client: redis.Redis | RedisCluster, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run it on `client` (on a cluster, routed by `keys`, which share one slot)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.lua, len(keys), *keys, *args)
