"""Presence: how many streams each worker has on each channel, written to Redis
for `GET /channels/<channel>` (answered by the publisher; docs/redis-contract.md).

No Redis write per client: once a second at most, a worker writes the channels
whose stream count changed, and every TTL/3 it refreshes all of them, one
script per partition. Each entry carries a deadline in Redis's own clock, so
the count of a worker that died without cleaning up stops counting after
`PRESENCE_TTL_SECONDS` and the key expires with it.

When Redis is full (`maxmemory`), counts are not written (Redis refuses the
script as a whole, up front) and are tried again on the next tick; streams are
not affected, and a worker's counts lapse at their deadline as if it had gone.
Removing a count frees memory, so that is allowed even then.

While webhooks are on (WEBHOOKS), the same writes run occupancy.py's scripts,
which also keep each channel's occupancy and write its `channel.occupied` and
`channel.vacated` events in the same step (docs/webhooks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError

from . import occupancy
from .contract import Script, presence_key

log = logging.getLogger("herald.stream.presence")

# KEYS = presence hashes of one partition's channels; ARGV[1] = worker id,
# ARGV[2] = TTL (ms), then one count (> 0) per key.
# Field value: "<count> <deadline ms, Redis clock>".
# The shebang (no `allow-oom`): refused as a whole, before any write, when
# Redis is over its maxmemory.
WRITE = Script("""#!lua
local now = redis.call('TIME')
local deadline = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[i + 2] .. ' ' .. deadline)
  redis.call('PEXPIRE', key, ARGV[2])
end
return #KEYS
""")

# KEYS = presence hashes of one partition's channels where this worker has no
# stream any more; ARGV[1] = worker id. Only deletes: allowed when Redis is full.
FORGET = Script("""#!lua flags=allow-oom
for _, key in ipairs(KEYS) do
  redis.call('HDEL', key, ARGV[1])
end
return #KEYS
""")


class Presence:
    """Writes this worker's stream count per channel, only when it changed (and to refresh)."""

    def __init__(
        self,
        client: Callable[[], redis.Redis | RedisCluster],
        ttl_seconds: float,
        vacated_delay_seconds: float | None = None,
    ) -> None:
        """`vacated_delay_seconds`: webhooks are on (occupancy kept), with that delay; None: off."""
        self._client = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._delay_ms = None if vacated_delay_seconds is None else int(vacated_delay_seconds * 1000)
        self._refresh = ttl_seconds / 3
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._written: dict[tuple[int, str], int] = {}  # what Redis holds for this worker
        self._next_refresh = 0.0
        self._full = False  # Redis refused the last write for memory (logged once)

    def sync(self, counts: dict[tuple[int, str], int]) -> None:
        """Write what changed since the last sync (everything, when a refresh is due).

        `counts` holds this worker's streams per (partition, channel) now
        (`Core.stream_counts`).
        """
        now = time.monotonic()
        if now >= self._next_refresh:
            due = dict(counts)
        else:
            due = {k: n for k, n in counts.items() if self._written.get(k) != n}
        due.update({k: 0 for k in self._written if k not in counts})
        if not due:
            return
        try:
            self._write(due)
        except OutOfMemoryError:
            if not self._full:
                log.warning(
                    "Redis is full (maxmemory): presence counts are not written until it has room; "
                    "streams are not affected"
                )
                self._full = True
            return
        except (redis.RedisError, OSError) as exc:
            log.info("could not write presence (%s); retrying on the next tick", exc)
            return
        if self._full:
            log.warning("Redis has room again: presence counts are written")
            self._full = False
        if now >= self._next_refresh:
            self._next_refresh = now + self._refresh
        self._written = counts

    def clear(self) -> None:
        """The worker is stopping: its counts leave now rather than at their deadline."""
        with_zero = dict.fromkeys(self._written, 0)
        if with_zero:
            with contextlib.suppress(redis.RedisError, OSError):  # else they expire on their own
                self._write(with_zero)
            self._written = {}

    def _write(self, due: dict[tuple[int, str], int]) -> None:
        """Remove the counts that went to 0, then write the others (one script each per partition)."""
        gone: dict[int, list[str]] = {}
        kept: dict[int, list[tuple[str, int]]] = {}
        for (partition, channel), count in due.items():
            if count > 0:
                kept.setdefault(partition, []).append((channel, count))
            else:
                gone.setdefault(partition, []).append(channel)
        client = self._client()
        if self._delay_ms is not None:
            self._write_occupancy(client, gone, kept, self._delay_ms)
            return
        for partition, channels in gone.items():
            keys = [presence_key(channel, partition) for channel in channels]
            FORGET.run(client, keys, [self.worker])
        for partition, entries in kept.items():
            keys = [presence_key(channel, partition) for channel, _ in entries]
            args: list[Any] = [self.worker, self._ttl_ms, *(count for _, count in entries)]
            WRITE.run(client, keys, args)

    def _write_occupancy(
        self,
        client: redis.Redis | RedisCluster,
        gone: dict[int, list[str]],
        kept: dict[int, list[tuple[str, int]]],
        delay_ms: int,
    ) -> None:
        """As `_write`, with each channel's occupancy and its webhook events (occupancy.py)."""
        for partition, channels in gone.items():
            keys = [*occupancy.header_keys(partition), *(presence_key(c, partition) for c in channels)]
            occupancy.FORGET.run(client, keys, [self.worker, delay_ms, *channels])
        for partition, entries in kept.items():
            keys = [*occupancy.header_keys(partition), *(presence_key(c, partition) for c, _ in entries)]
            args: list[Any] = [self.worker, self._ttl_ms, delay_ms]
            for channel, count in entries:
                args += [channel, count]
            occupancy.WRITE.run(client, keys, args)
