"""Resume from history: the stream service's read side of the Redis contract.

Per partition, one read-only Lua script returns, atomically, the partition's
current epoch and sequence number and a bounded page of events on some of its
channels, merged across them in publish order: after a position (a resume, a
gap), or the newest ones (`GET /history` without `after`). It checks first
(the epoch, a position from the future, trimmed history) and reads only as far
as the page goes: at most `most` events, and no more once `budget` bytes of
data are in (a page holds at least one event), plus a few entries of
look-ahead per channel. A page that stops short says so (`Replay.complete` is
False) and the caller reads on from its last event, so no request, whatever its
gap, makes Redis or this process hold more than a page
(docs/redis-contract.md, "Reading history").
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.cluster import RedisCluster

from .contract import Script, channels_key, meta_key, stream_key
from .ids import Position
from .records import HistoryEvent, Replay

# KEYS[1] = meta hash, KEYS[2] = channel index, KEYS[3..] = channel streams (all
# of one partition: one slot on a cluster). ARGV[1] = 'after' (oldest first) or
# 'before' (newest first); ARGV[2] = the position (seq) to read after or before
# ('' with 'before': from the newest); ARGV[3] = most events; ARGV[4] = byte
# budget; ARGV[5] = the epoch the position is in ('' = no checks); ARGV[6..] =
# the channel names, in KEYS order. Returns {epoch, seq, reset or '', complete
# (1 or 0), then per event: channel index (1-based), seq, event name, data}.
#
# The checks, with an epoch and 'after', come before any event is read: another
# epoch; a position ahead of the partition; an event after the position that
# history no longer holds (the first entry left names a predecessor after it,
# or none is left although the channel's newest event is after it; a channel
# missing from the index counts the partition's `forgotten` as its newest).
# While merging, each channel is read 1, 2, 4 then 8 entries at a time, so the
# look-ahead beyond the page stays within 8 entries per channel.
READ = Script("""#!lua flags=no-writes
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'forgotten')
local epoch, seq = meta[1] or '', tonumber(meta[2] or '0')
local out = {epoch, seq, '', 1}
local forward, at_seq, most, budget = ARGV[1] == 'after', ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local check = forward and ARGV[5] ~= ''
if check and epoch ~= ARGV[5] then out[3] = 'epoch_changed' return out end
if check and tonumber(at_seq) > seq then out[3] = 'unknown_id' return out end

local function field(fields, name)
  for j = 1, #fields, 2 do if fields[j] == name then return fields[j + 1] end end
end
local n = #KEYS - 2
local buf, next_at, take, done = {}, {}, {}, {}
local function fetch(i, from)
  if forward then
    buf[i] = redis.call('XRANGE', KEYS[i + 2], from, '+', 'COUNT', take[i])
  else
    buf[i] = redis.call('XREVRANGE', KEYS[i + 2], from, '-', 'COUNT', take[i])
  end
  next_at[i] = 1
  done[i] = #buf[i] < take[i]
  take[i] = math.min(take[i] * 2, 8)
end

local start = '+'
if at_seq ~= '' then start = '(' .. at_seq .. '-0' end
for i = 1, n do
  take[i] = 1
  fetch(i, start)
  if check then
    local first, prev = buf[i][1], nil
    if first then prev = field(first[2], 'prev') or '0'
    else prev = redis.call('HGET', KEYS[2], ARGV[i + 5]) or meta[3] or '0' end
    if tonumber(prev) > tonumber(at_seq) then out[3] = 'history_trimmed' return out end
  end
end

local count, bytes = 0, 0
while true do
  local best, best_seq
  for i = 1, n do
    if next_at[i] > #buf[i] and not done[i] then fetch(i, '(' .. buf[i][#buf[i]][1]) end
    local e = buf[i][next_at[i]]
    if e then
      local s = tonumber(string.match(e[1], '^%d+'))
      if best == nil or (forward and s < best_seq) or (not forward and s > best_seq) then
        best, best_seq = i, s
      end
    end
  end
  if best == nil then break end
  if count >= most or (count > 0 and bytes >= budget) then out[4] = 0 break end
  local fields = buf[best][next_at[best]][2]
  next_at[best] = next_at[best] + 1
  local name, data = field(fields, 'event') or 'message', field(fields, 'data') or 'null'
  out[#out + 1] = best
  out[#out + 1] = best_seq
  out[#out + 1] = name
  out[#out + 1] = data
  count = count + 1
  bytes = bytes + #name + #data
end
return out
""")


# KEYS[1] = meta hash; ARGV[1] = candidate epoch, ARGV[2] = the worker's epoch
# ('' before its first connection), ARGV[3] = the last seq it dispatched,
# ARGV[4] = the partition count. Returns {epoch, seq} or {'', stored count}.
# allow-oom: it writes a few bytes at most, and a full Redis must not stop the
# stream workers from serving what it holds.
META = Script("""#!lua flags=allow-oom
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
""")


def new_epoch() -> str:
    """A fresh random epoch (12 hex digits), offered with HSETNX; the first one wins."""
    return secrets.token_hex(6)


class PartitionsMismatch(Exception):
    """Redis holds data partitioned in another number of partitions than ours."""


class History:
    """Reads a partition's state and missed events from Redis (a server or a cluster)."""

    def __init__(self, client: Callable[[], redis.Redis | RedisCluster], partitions: int = 1) -> None:
        # On a cluster, redis-py routes each call by its keys, which share one slot.
        self._client = client
        self._partitions = partitions

    def meta(self, partition: int, seen: Position | None) -> Position:
        """The partition's current epoch and sequence number, creating the epoch if there is none.

        `seen` is the last position the caller dispatched: if Redis is behind
        it in the same epoch (writes were lost), a new epoch begins first.
        Raises PartitionsMismatch if the data was written with another PARTITIONS.
        """
        seen_args: list[str | int] = [seen.epoch, seen.seq] if seen else ["", 0]
        args = [new_epoch(), *seen_args, self._partitions]
        epoch, seq = META.run(self._client(), [meta_key(partition)], args)
        if not epoch:
            raise PartitionsMismatch(
                f"Redis holds data for PARTITIONS={seq.decode()}, this service has "
                f"PARTITIONS={self._partitions}: set the same value everywhere"
            )
        return Position(epoch.decode(), int(seq))

    def page(
        self,
        partition: int,
        channels: Sequence[str],
        *,
        after: Position | None = None,
        before: int | None = None,
        check: bool = True,
        most: int,
        budget: int,
    ) -> Replay:
        """One page of events on `channels` (all of `partition`), oldest first, with
        the partition's epoch and sequence number when it was read.

        With `after`: the events after that position (with `check`, a replay
        that cannot be complete comes back as a reset: another epoch, a future
        position, trimmed history). Without: the newest events (before seq
        `before`, if given). At most `most` events, and none past the one that
        brings the data to `budget` bytes; `complete` says whether the page
        holds every event there is (after `after`, or before its oldest).
        """
        keys = [meta_key(partition), channels_key(partition)] + [stream_key(c, partition) for c in channels]
        if after is not None:
            args: list[Any] = ["after", after.seq, most, budget, after.epoch if check else ""]
        else:
            args = ["before", "" if before is None else before, most, budget, ""]
        raw = READ.run(self._client(), keys, [*args, *channels])
        replay = Replay(raw[0].decode(), int(raw[1]), reset=raw[2].decode() or None, complete=raw[3] == 1)
        events = [
            HistoryEvent(int(seq), channels[index - 1], event, data)
            for index, seq, event, data in zip(raw[4::4], raw[5::4], raw[6::4], raw[7::4], strict=True)
        ]
        replay.events = events if after is not None else events[::-1]
        return replay

    def now(self, partition: int) -> Replay:
        """The partition's current epoch and sequence number (no events)."""
        raw: Any = self._client().hmget(meta_key(partition), ["epoch", "seq"])
        epoch, seq = raw
        return Replay((epoch or b"").decode(), int(seq or 0))
