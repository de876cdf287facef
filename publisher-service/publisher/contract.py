"""The Redis contract's names, as the publisher writes them (docs/redis-contract.md, version 2).

Channels are grouped in partitions (crc32 of the name, mod PARTITIONS), and
every key of partition p carries the hash tag `{p<p>}`, so that one partition's
keys share a Redis Cluster slot. Every key name the publisher uses is made
here. tests/support/keys.py spells the same names from the document, and
tests/integration/test_contract.py checks that the two agree.
"""

from __future__ import annotations

import secrets
import zlib
from dataclasses import dataclass


def partition_of(channel: str, partitions: int) -> int:
    """The channel's partition: CRC-32 (zlib, IEEE 802.3) of its name, mod P."""
    return zlib.crc32(channel.encode()) % partitions


def key_prefix(partition: int) -> str:
    """The start of every key of a partition, hash tag included: `herald:{p3}:`."""
    return f"herald:{{p{partition}}}:"


@dataclass(frozen=True)
class Keys:
    """The key names of one partition."""

    meta: str
    channels: str
    stream: str  # + channel
    idempotency: str  # + <caller>:<key>
    live: str  # + channel (sharded Pub/Sub)
    expiries: str
    presence: str  # + channel (written by the stream service)
    occupancy: str  # channels occupied or vacating, by name (written while webhooks are on)

    @classmethod
    def of(cls, partition: int) -> Keys:
        prefix = key_prefix(partition)
        return cls(
            prefix + "meta",
            prefix + "channels",
            prefix + "stream:",
            prefix + "idem:",
            prefix + "live:",
            prefix + "expiries",
            prefix + "presence:",
            prefix + "occupancy",
        )


def new_epoch() -> str:
    """A fresh random epoch: 12 lowercase hex digits."""
    return secrets.token_hex(6)
