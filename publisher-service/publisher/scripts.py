"""The publisher's Lua scripts, and how a script is run: by its SHA1 (EVALSHA),
sent whole (EVAL) only when Redis does not hold it yet.

PUBLISH stores one partition's events of a request: it appends each event to
its channel's history stream and announces it on the channel's sharded Pub/Sub
channel, in one atomic round trip, so no subscriber can see a live event that
history lacks. With a history TTL, it also records when each channel's history
expires, and sweeps a bounded number of channels whose history has expired out
of the channel index (docs/redis-contract.md, "Expired channels"). PRESENCE
sums a channel's subscribers over the stream workers; SUBSCRIBERS does the
same for several channels of one partition at once (a page of
`GET /channels?occupied=true`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from .routing import Connection, Step, call

# KEYS[1] = meta hash, KEYS[2] = channels hash, KEYS[3] = idempotency record
# (unused when ARGV[4] is empty), KEYS[4] = expiries sorted set (unused when
# ARGV[3] is 0), KEYS[4+i] = stream of event i; all of one partition.
# ARGV[1] = candidate epoch, ARGV[2] = history maxlen, ARGV[3] = idle TTL (0: none),
# ARGV[4] = request fingerprint ('' without Idempotency-Key), ARGV[5] = its window (s),
# ARGV[6] = P (PARTITIONS), ARGV[7] = the partition's live prefix (`herald:{p<p>}:live:`),
# ARGV[8] = its stream prefix (`herald:{p<p>}:stream:`), ARGV[9] = most expiries swept,
# then per event: channel, event name, data.
# Returns {epoch, {seq...}, ''} or, for a repeated key, {epoch, {seq...}, fingerprint};
# the error `HERALD_PARTITIONS <stored P>` if the partition was written with another P.
#
# The shebang (no `allow-oom` flag) makes Redis refuse the whole script up
# front, with an OOM error, while its memory is over `maxmemory`: a request is
# stored entirely or not at all. (Without one, Redis 7 checks only the
# script's first write, and any write at all, even a DEL, lets the rest
# through.) Reads come before the first write, so that an error in them
# leaves nothing half done.
PUBLISH_LUA = """#!lua
if ARGV[4] ~= '' then
  local prior = redis.call('HMGET', KEYS[3], 'fingerprint', 'epoch', 'seqs')
  if prior[1] then
    -- A write, so that a WAIT after this replay covers the first request's writes too.
    redis.call('HINCRBY', KEYS[3], 'replays', 1)
    local seqs = {}
    for seq in string.gmatch(prior[3], '[^,]+') do seqs[#seqs + 1] = tonumber(seq) end
    return {prior[2], seqs, prior[1]}
  end
end
-- Checked before anything is written: data of another P stays untouched.
local stored = redis.call('HMGET', KEYS[1], 'partitions', 'forgotten')
if stored[1] and stored[1] ~= ARGV[6] then
  return redis.error_reply('HERALD_PARTITIONS ' .. stored[1])
end
local forgotten = stored[2] or '0'
local ttl = tonumber(ARGV[3])
local n = #KEYS - 4
-- The request's channels, each with its stream key, in order of first mention.
local streams, channels = {}, {}
for i = 5, #KEYS do
  local channel = ARGV[10 + (i - 5) * 3]
  if streams[channel] == nil then
    streams[channel] = KEYS[i]
    channels[#channels + 1] = channel
  end
end
-- The expiry sweep's reads: channels whose history should have expired by now
-- (a bounded number per publish; this request's own are re-scored below anyway).
local deadline
local gone, unwatched, rescored, newest_gone = {}, {}, {}, {}
if ttl > 0 then
  local now = redis.call('TIME')
  local ms = now[1] * 1000 + math.floor(now[2] / 1000)
  deadline = ms + ttl * 1000
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[9]))
  for _, channel in ipairs(due) do
    if streams[channel] == nil then
      local left = redis.call('PTTL', ARGV[8] .. channel)
      if left == -2 then
        gone[#gone + 1] = channel
        newest_gone[#gone] = redis.call('HGET', KEYS[2], channel)
      elseif left == -1 then
        unwatched[#unwatched + 1] = channel  -- kept for ever now (HISTORY_TTL_SECONDS=0)
      else
        rescored[#rescored + 1] = {ms + left, channel}  -- not expired yet (clock skew)
      end
    end
  end
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[6])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
-- Channels whose history expired leave the index; `forgotten` keeps the
-- newest seq any of them had, so that a gap on such a channel stays detectable.
if #gone > 0 then
  local raised, highest = tonumber(forgotten), nil
  for i = 1, #gone do
    local newest = newest_gone[i]
    if newest and tonumber(newest) > raised then raised, highest = tonumber(newest), newest end
  end
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[4], unpack(gone))
  if highest then
    forgotten = highest
    redis.call('HSET', KEYS[1], 'forgotten', forgotten)
  end
end
if #unwatched > 0 then redis.call('ZREM', KEYS[4], unpack(unwatched)) end
for _, entry in ipairs(rescored) do redis.call('ZADD', KEYS[4], entry[1], entry[2]) end
-- One counter step for the whole request, then per event only XADD and SPUBLISH;
-- each channel's newest seq is read and written, and its stream's TTL set,
-- once per request (a batch often holds several events of one channel).
local seq = redis.call('HINCRBY', KEYS[1], 'seq', n) - n
local seqs, newest = {}, {}
for i = 5, #KEYS do
  local a = 10 + (i - 5) * 3
  local channel, event, data = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  seq = seq + 1
  local prev = newest[channel]
  if prev == nil then
    -- A channel the index does not hold (new, or forgotten): its previous
    -- event, if it had one, is at most `forgotten`.
    prev = redis.call('HGET', KEYS[2], channel) or forgotten
  end
  newest[channel] = seq
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], seq .. '-0',
             'event', event, 'data', data, 'prev', prev)
  redis.call('SPUBLISH', ARGV[7] .. channel, epoch .. ' ' .. seq .. ' ' .. event .. ' ' .. data)
  seqs[#seqs + 1] = seq
end
for _, channel in ipairs(channels) do
  redis.call('HSET', KEYS[2], channel, newest[channel])
  if ttl > 0 then
    redis.call('EXPIRE', streams[channel], ttl)
    redis.call('ZADD', KEYS[4], deadline, channel)
  end
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[4], 'epoch', epoch, 'seqs', table.concat(seqs, ','))
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return {epoch, seqs, ''}
"""

# Most channels one publish forgets from the index (bounded work per request).
SWEEP_LIMIT = 32

# The start of the error PUBLISH answers for a partition written with another P.
PARTITIONS_ERROR = "HERALD_PARTITIONS "


# A presence hash has a field per stream worker, value "<streams> <deadline ms>"
# (Redis's clock); `live(key)` sums the streams of the workers whose deadline
# has not passed by Redis's TIME (a dead worker's count lapses).
_LIVE = """
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local function live(key)
  local total = 0
  local fields = redis.call('HGETALL', key)
  for i = 2, #fields, 2 do
    local count, deadline = string.match(fields[i], '^(%d+) (%d+)$')
    if count and tonumber(deadline) >= ms then total = total + tonumber(count) end
  end
  return total
end
"""

# KEYS[1] = a channel's presence hash. Returns its live streams.
PRESENCE_LUA = (
    "#!lua flags=no-writes\n"
    + _LIVE
    + """
return live(KEYS[1])
"""
)

# KEYS = presence hashes of channels of one partition (one slot). Returns the
# live streams of each, in order (0 for a key that does not exist).
SUBSCRIBERS_LUA = (
    "#!lua flags=no-writes\n"
    + _LIVE
    + """
local counts = {}
for k = 1, #KEYS do counts[k] = live(KEYS[k]) end
return counts
"""
)


class Script:
    """A Lua script: its text, its SHA1, and the step that runs it on a connection."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def step(self, keys: Sequence[str], args: Sequence[str | int]) -> Step[Any]:
        """Run the script with `keys` and `args`: EVALSHA, then EVAL if Redis lacks it."""
        command = (len(keys), *keys, *args)

        def run(conn: Connection, asking: bool) -> Any:
            try:
                return call(conn, asking, ("EVALSHA", self.sha, *command))
            except NoScriptError:
                return call(conn, asking, ("EVAL", self.text, *command))

        return run


PUBLISH = Script(PUBLISH_LUA)
PRESENCE = Script(PRESENCE_LUA)
SUBSCRIBERS = Script(SUBSCRIBERS_LUA)
