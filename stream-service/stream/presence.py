"""Presence: how many streams each worker has on each channel, written to Redis
for `GET /channels/<channel>` (answered by the publisher; docs/redis-contract.md).

No Redis write per client: once a second at most, a worker writes the channels
whose stream count changed, and every TTL/3 it refreshes all of them, one
script per partition. Each entry carries a deadline in Redis's own clock, so
the count of a worker that died without cleaning up stops counting after
`PRESENCE_TTL_SECONDS` and the key expires with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from .core import Core, tag

log = logging.getLogger("herald.stream.presence")

# KEYS = presence hashes of one partition's channels; ARGV[1] = worker id,
# ARGV[2] = TTL (ms), then one count per key (0: this worker has none any more).
# Field value: "<count> <deadline ms, Redis clock>".
WRITE_LUA = """
local now = redis.call('TIME')
local deadline = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[i + 2])
  if count > 0 then
    redis.call('HSET', key, ARGV[1], count .. ' ' .. deadline)
    redis.call('PEXPIRE', key, ARGV[2])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return #KEYS
"""
WRITE_SHA = hashlib.sha1(WRITE_LUA.encode()).hexdigest()


def presence_key(partition: int, channel: str) -> str:
    return f"{tag(partition)}:presence:{channel}"


class Presence:
    """Writes this worker's stream count per channel, only when it changed (and to refresh)."""

    def __init__(self, client: Callable[[], redis.Redis | RedisCluster], ttl_seconds: float) -> None:
        self._client = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._refresh = ttl_seconds / 3
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._written: dict[tuple[int, str], int] = {}  # what Redis holds for this worker
        self._next_refresh = 0.0

    def counts(self, core: Core) -> dict[tuple[int, str], int]:
        """Streams per channel on this worker, now."""
        return {(c.part.number, c.name): len(c.streams) for c in core.channels.values() if c.streams}

    def sync(self, core: Core) -> None:
        """Write what changed since the last sync (everything, when a refresh is due)."""
        now = time.monotonic()
        counts = self.counts(core)
        if now >= self._next_refresh:
            due = dict(counts)
        else:
            due = {k: n for k, n in counts.items() if self._written.get(k) != n}
        due.update({k: 0 for k in self._written if k not in counts})
        if not due:
            return
        try:
            self._write(due)
        except (redis.RedisError, OSError) as exc:
            log.info("could not write presence (%s); retrying on the next tick", exc)
            return
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
        by_partition: dict[int, list[tuple[str, int]]] = {}
        for (partition, channel), count in due.items():
            by_partition.setdefault(partition, []).append((channel, count))
        client = self._client()
        for partition, entries in by_partition.items():
            keys = [presence_key(partition, channel) for channel, _ in entries]
            args: list[Any] = [self.worker, self._ttl_ms, *(count for _, count in entries)]
            try:
                client.evalsha(WRITE_SHA, len(keys), *keys, *args)
            except NoScriptError:
                client.eval(WRITE_LUA, len(keys), *keys, *args)
