"""Resume from history: the stream service's read side of the Redis contract.

Per partition, one read-only Lua script returns, atomically, the partition's
current epoch and sequence number and, for each of its channels, the events
after a position together with the channel's newest sequence number. From that we either replay exactly the
missed events, merged across channels in publish order, or tell the client to
reset (docs/redis-contract.md, "Reading history").
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from .core import HistoryEvent, Position, Replay, tag

# All keys of one call carry the same partition's hash tag (one slot on a cluster).
# KEYS[1] = meta hash, KEYS[2] = channels hash, KEYS[3..] = channel streams;
# ARGV[1] = position (seq), ARGV[2..] = the channel names, in KEYS order.
READ_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local out = {meta[1] or '', meta[2] or '0'}
for i = 3, #KEYS do
  out[#out + 1] = redis.call('HGET', KEYS[2], ARGV[i - 1]) or '0'
  out[#out + 1] = redis.call('XRANGE', KEYS[i], '(' .. ARGV[1] .. '-0', '+')
end
return out
"""


# KEYS as READ_LUA; ARGV[1] = how many. The newest ARGV[1] entries of each channel.
RECENT_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local out = {meta[1] or '', meta[2] or '0'}
for i = 3, #KEYS do
  out[#out + 1] = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', ARGV[1])
end
return out
"""


# KEYS[1] = meta hash; ARGV[1] = candidate epoch, ARGV[2] = the worker's epoch
# ('' before its first connection), ARGV[3] = the last seq it dispatched,
# ARGV[4] = the partition count. Returns {epoch, seq} or {'', stored count}.
META_LUA = """
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[4])
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'partitions')
if meta[3] ~= ARGV[4] then return {'', meta[3]} end
local seq = tonumber(meta[2] or '0')
if meta[1] == ARGV[2] and seq < tonumber(ARGV[3]) then
  -- Events this worker dispatched are gone (a failover to a replica that lagged):
  -- a new epoch begins, so that the numbers given out next never repeat an id.
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  meta[1] = ARGV[1]
end
return {meta[1], seq}
"""


READ_SHA = hashlib.sha1(READ_LUA.encode()).hexdigest()
RECENT_SHA = hashlib.sha1(RECENT_LUA.encode()).hexdigest()
META_SHA = hashlib.sha1(META_LUA.encode()).hexdigest()


def new_epoch() -> str:
    """A fresh random epoch (12 hex digits), offered with HSETNX; the first one wins."""
    return secrets.token_hex(6)


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _fields(raw: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(raw[::2], raw[1::2], strict=True))


def _entries(channel: str, raw: list[list[Any]]) -> list[HistoryEvent]:
    events = []
    for entry_id, fields in raw:
        values = _fields(fields)
        event = values.get(b"event", b"message")
        events.append(HistoryEvent(_seq(entry_id), channel, event, values.get(b"data", b"null")))
    return events


def _gap(after: int, newest: int, entries: list[list[Any]]) -> bool:
    """True if an event of the channel after `after` is no longer in history.

    Trimming removes the oldest entries only, so an event after `after` is gone
    exactly when the first entry left after it names a predecessor the client
    has not seen, or when nothing is left although newer events were published.
    """
    if not entries:
        return newest > after
    return int(_fields(entries[0][1]).get(b"prev", b"0")) > after


class PartitionsMismatch(Exception):
    """Redis holds data partitioned in another number of partitions than ours."""


class History:
    """Reads a partition's state and missed events from Redis (a server or a cluster)."""

    def __init__(self, client: Callable[[], redis.Redis | RedisCluster], partitions: int = 1) -> None:
        # On a cluster, redis-py routes each call by its keys, which share one slot.
        self._client = client
        self._partitions = partitions

    def _run(self, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, or EVAL the first time a node lacks the script."""
        client = self._client()
        try:
            return client.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(script, len(keys), *keys, *args)

    def meta(self, partition: int, seen: Position | None) -> Position:
        """The partition's current epoch and sequence number, creating the epoch if there is none.

        `seen` is the last position the caller dispatched: if Redis is behind
        it in the same epoch (writes were lost), a new epoch begins first.
        Raises PartitionsMismatch if the data was written with another PARTITIONS.
        """
        seen_args: list[str | int] = [seen.epoch, seen.seq] if seen else ["", 0]
        args = [new_epoch(), *seen_args, self._partitions]
        epoch, seq = self._run(META_LUA, META_SHA, [f"{tag(partition)}:meta"], args)
        if not epoch:
            raise PartitionsMismatch(
                f"Redis holds data for PARTITIONS={seq.decode()}, this service has "
                f"PARTITIONS={self._partitions}: set the same value everywhere"
            )
        return Position(epoch.decode(), int(seq))

    def recent(self, partition: int, channels: Sequence[str], limit: int) -> Replay:
        """The newest `limit` events on `channels` (all of `partition`), oldest first,
        with the partition's position when they were read (one atomic read)."""
        prefix = tag(partition)
        keys = [f"{prefix}:meta", f"{prefix}:channels"] + [f"{prefix}:stream:{c}" for c in channels]
        raw = self._run(RECENT_LUA, RECENT_SHA, keys, [limit])
        per_channel = [_entries(c, list(reversed(e))) for c, e in zip(channels, raw[2:], strict=True)]
        events = list(heapq.merge(*per_channel, key=lambda e: e.seq))
        return Replay(raw[0].decode(), int(raw[1]), events[-limit:] if limit else [])

    def now(self, partition: int) -> Replay:
        """The partition's current epoch and sequence number (no events)."""
        raw: Any = self._client().hmget(f"{tag(partition)}:meta", ["epoch", "seq"])
        epoch, seq = raw
        return Replay((epoch or b"").decode(), int(seq or 0))

    def read(self, partition: int, channels: Sequence[str], after: Position, *, check: bool = True) -> Replay:
        """Events on `channels` (all of `partition`) after `after`, in publish order.

        With `check`, a replay that cannot be complete becomes a reset instead:
        another epoch, an unknown (future) position, or trimmed history.
        """
        prefix = tag(partition)
        keys = [f"{prefix}:meta", f"{prefix}:channels"] + [f"{prefix}:stream:{c}" for c in channels]
        raw = self._run(READ_LUA, READ_SHA, keys, [after.seq, *channels])
        epoch, seq = raw[0].decode(), int(raw[1])
        replay = Replay(epoch, seq)
        if check and epoch != after.epoch:
            replay.reset = "epoch_changed"
        elif check and after.seq > seq:
            replay.reset = "unknown_id"
        if replay.reset:
            return replay
        per_channel = []
        for channel, newest, entries in zip(channels, raw[2::2], raw[3::2], strict=True):
            if check and _gap(after.seq, int(newest), entries):
                replay.reset = "history_trimmed"
                return replay
            per_channel.append(_entries(channel, entries))
        replay.events = list(heapq.merge(*per_channel, key=lambda e: e.seq))
        return replay
