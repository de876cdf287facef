"""Who sends which lane: one dispatcher at a time holds each lane, by a lease
in Redis, and the live dispatchers split the lanes between them.

A holder renews its leases six times per WEBHOOK_LEASE_SECONDS. It starts a
POST only while its lease has more than the request's timeout left (by its own
clock, counted from before the renewal was sent), so when a lease lapses and
another dispatcher takes the lane, the old holder has no request in flight:
a lane's events go out one at a time, in order, even across a takeover.
"""

from __future__ import annotations

import math
import time

import redis
from redis.cluster import RedisCluster

from .contract import Script, lease_key, registry_key

# Lease upkeep runs when Redis is full too (allow-oom): it grows nothing but
# one registry member, and delivery (which frees lane entries) must go on.
RENEW = Script("""#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""")

# KEYS = leases of one partition (one slot); ARGV[1] = dispatcher id, ARGV[2] = TTL (ms).
# Returns one 1 (renewed) or 0 (lost) per key.
RENEW_MANY = Script("""#!lua flags=allow-oom
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    renewed[i] = redis.call('PEXPIRE', key, ARGV[2])
  else
    renewed[i] = 0
  end
end
return renewed
""")

RELEASE = Script("""#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS[1] = the registry; ARGV[1] = dispatcher id, ARGV[2] = its TTL (ms; 0: leaving).
# Returns the number of live dispatchers.
REGISTER = Script("""#!lua flags=allow-oom
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
if ARGV[2] == '0' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
""")

Client = redis.Redis | RedisCluster


class Lease:
    """This dispatcher's claim on one lane."""

    def __init__(self, client: Client, partition: int, lane: int, me: str, seconds: float) -> None:
        self._client = client
        self._key = lease_key(partition, lane)
        self._me = me
        self._seconds = seconds
        self._valid_until = 0.0  # monotonic

    def acquire(self) -> bool:
        """Take the lane if no one holds it (or this dispatcher already does)."""
        sent = time.monotonic()
        if self._client.set(self._key, self._me, nx=True, px=int(self._seconds * 1000)):
            self._valid_until = sent + self._seconds
            return True
        return self.renew()

    def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if another took it or it lapsed."""
        sent = time.monotonic()
        if RENEW.run(self._client, [self._key], [self._me, int(self._seconds * 1000)]) == 1:
            self._valid_until = sent + self._seconds
            return True
        self._valid_until = 0.0
        return False

    def renewed(self, sent: float, ok: bool) -> None:
        """The outcome of a renewal sent at `sent` (monotonic) for several leases at once."""
        self._valid_until = sent + self._seconds if ok else 0.0

    @property
    def key(self) -> str:
        return self._key

    def release(self) -> None:
        """Give the lane up at once (a clean stop), so another takes it without waiting."""
        self._valid_until = 0.0
        RELEASE.run(self._client, [self._key], [self._me])

    def remaining(self) -> float:
        """Seconds the lease surely still holds."""
        return self._valid_until - time.monotonic()


def renew_all(client: Client, me: str, seconds: float, held: dict[int, list[Lease]]) -> None:
    """Renew every lease held, one script per partition (its leases share a slot)."""
    for leases in held.values():
        sent = time.monotonic()
        answers = RENEW_MANY.run(client, [lease.key for lease in leases], [me, int(seconds * 1000)])
        for lease, answer in zip(leases, answers, strict=True):
            lease.renewed(sent, answer == 1)


def register(client: Client, me: str, ttl_seconds: float) -> int:
    """Say this dispatcher is alive for `ttl_seconds` (0: leaving); how many are."""
    return int(REGISTER.run(client, [registry_key()], [me, int(ttl_seconds * 1000)]))


def share(lanes: int, dispatchers: int) -> int:
    """How many lanes each live dispatcher should hold."""
    return math.ceil(lanes / max(1, dispatchers))
