# Twins: Script() in publisher-service/dispatcher/contract.py
# and stream-service/stream/contract.py is the same class:
# change both together (tests/unit/test_conventions.py checks it).
"""The dispatcher's side of the Redis contract (docs/redis-contract.md,
"Occupancy" and "Webhook delivery"): the partition's hash tag, the keys only
the dispatcher names, and how its Lua scripts run.

The occupancy keys and scripts it shares with the stream service are in
occupancy.py (a twin of the stream service's). Every key of partition `p`
starts with `herald:{p<p>}`, so each script touches one slot on a cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

DEAD_MAXLEN = 10000  # dead letters kept per partition (`~`)


def tag(partition: int) -> str:
    """The hash tag prefix of every key of `partition`."""
    return f"herald:{{p{partition}}}"


def dead_key(partition: int) -> str:
    """The partition's dead letters: events an endpoint did not take within the retry window."""
    return f"{tag(partition)}:hooks:dead"


def lease_key(partition: int, lane: int) -> str:
    """Which dispatcher holds a lane (its id, with a TTL)."""
    return f"{tag(partition)}:hooks:lease:{lane}"


def numbers_read_key(partition: int) -> str:
    """The number of the last event each endpoint's group read from each lane
    (field `<group>:<lane>`), for whoever holds the lane next."""
    return f"{tag(partition)}:hooks:read"


def registry_key() -> str:
    """The live dispatchers, each scored by when it lapses (partition 0's slot)."""
    return f"{tag(0)}:hooks:dispatchers"


def group_name(url: str) -> str:
    """The consumer group of an endpoint: named by its URL, so a new URL starts a new group."""
    return "ep-" + hashlib.sha256(url.encode()).hexdigest()[:16]


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


def presence_key(channel: str, partition: int) -> str:
    """A channel's presence hash (written by the stream service; read by the sweep)."""
    return f"{tag(partition)}:presence:{channel}"
