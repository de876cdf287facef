"""The Redis contract's key names (docs/redis-contract.md, version 2), as the
tests spell them: written from the document, not imported from either service,
so that a service that drifts from the contract fails the tests."""

from __future__ import annotations

import zlib


def partition(channel: str, partitions: int = 1) -> int:
    """The channel's partition: crc32 of its name, mod the number of partitions."""
    return zlib.crc32(channel.encode()) % partitions


def tag(channel: str, partitions: int = 1) -> str:
    return f"herald:{{p{partition(channel, partitions)}}}"


def meta_key(channel: str, partitions: int = 1) -> str:
    """The meta hash (epoch, seq, partitions) of the channel's partition."""
    return f"{tag(channel, partitions)}:meta"


def channels_key(channel: str, partitions: int = 1) -> str:
    """The hash of newest seqs of the channel's partition."""
    return f"{tag(channel, partitions)}:channels"


def stream_key(channel: str, partitions: int = 1) -> str:
    return f"{tag(channel, partitions)}:stream:{channel}"


def live_key(channel: str, partitions: int = 1) -> str:
    """The sharded Pub/Sub channel that carries the channel's events."""
    return f"{tag(channel, partitions)}:live:{channel}"


def idempotency_pattern(partition_number: int) -> str:
    """A SCAN pattern for the idempotency records of one partition."""
    return f"herald:{{p{partition_number}}}:idem:*"


def channels_in_distinct_partitions(prefix: str, count: int, partitions: int) -> list[str]:
    """`count` channel names starting with `prefix`, each in a partition of its own."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < count:
        name = f"{prefix}.{i}"
        found.setdefault(partition(name, partitions), name)
        i += 1
    return list(found.values())


def channels_in_one_partition(prefix: str, count: int, partitions: int) -> list[str]:
    """`count` channel names starting with `prefix`, all in the same partition."""
    first = f"{prefix}.0"
    wanted = partition(first, partitions)
    names = [first]
    i = 1
    while len(names) < count:
        name = f"{prefix}.{i}"
        if partition(name, partitions) == wanted:
            names.append(name)
        i += 1
    return names


def expiries_key(channel: str, partitions: int = 1) -> str:
    """The sorted set of channels by when their history expires (ms, Redis clock)."""
    return f"{tag(channel, partitions)}:expiries"


def presence_key(channel: str, partitions: int = 1) -> str:
    """The hash of the channel's streams per stream worker ("<count> <deadline ms>")."""
    return f"{tag(channel, partitions)}:presence:{channel}"


def occupancy_key(partition_number: int) -> str:
    """The index of one partition's occupied (or vacating) channels, by name (score 0)."""
    return f"herald:{{p{partition_number}}}:occupancy"
