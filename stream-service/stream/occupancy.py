# Twins: stream-service/stream/occupancy.py and publisher-service/dispatcher/occupancy.py
# are identical, byte for byte: change both together (tests/unit/test_conventions.py checks it).
"""Occupancy: when a channel gains its first stream on any worker and loses its
last, written to Redis as webhook events in the same script as the presence
change (docs/webhooks.md, docs/redis-contract.md, "Occupancy").

The stream service runs WRITE and FORGET in place of its plain presence
scripts while webhooks are on; the webhook dispatcher runs SWEEP, which finds
the channels whose workers died (their presence deadlines passed) and the
vacated events that came due. Per channel the state is one of:

- vacant: in none of the sets below;
- occupied: in `occupied`, scored by the latest deadline of its presence fields
  (while that deadline is ahead, some worker still holds a stream on it);
- vacating: its last stream left; in `vacating`, scored by the time its
  `channel.vacated` is due (that time plus the delay). A stream back before
  then returns it to occupied and nothing is sent.

`index` lists the channels in either of the last two (score 0, by name), for
`GET /channels?occupied=true`. Events go to one of LANES streams per partition,
chosen by the channel's name, so a channel's events are in one stream, in
order, and the dispatchers can share a partition's lanes. Every key is the
partition's (one hash tag), so each script touches one slot.
"""

from __future__ import annotations

from .contract import Script, tag

LANES = 8  # event streams per partition; part of the contract (a channel's lane is fixed by it)
LANE_MAXLEN = 10000  # per lane, `~`: the backlog kept while no dispatcher drains it
HEADER = 4 + LANES  # KEYS before the presence keys: occupied, vacating, index, numbers, lanes

OCCUPIED = "channel.occupied"
VACATED = "channel.vacated"


def occupied_key(partition: int) -> str:
    """Occupied channels, each scored by its presence's latest deadline (ms)."""
    return f"{tag(partition)}:occupied"


def vacating_key(partition: int) -> str:
    """Channels whose last stream left, each scored by when it is vacated (ms)."""
    return f"{tag(partition)}:vacating"


def index_key(partition: int) -> str:
    """Channels occupied or vacating, by name (score 0)."""
    return f"{tag(partition)}:occupancy"


def numbers_key(partition: int) -> str:
    """Each lane's last event number: events are numbered 1, 2, ... per lane, so a
    reader can tell how many the lane's cap trimmed before it read them."""
    return f"{tag(partition)}:hooks:numbers"


def lane_key(partition: int, lane: int) -> str:
    """One of the partition's webhook event streams."""
    return f"{tag(partition)}:hooks:{lane}"


def header_keys(partition: int) -> list[str]:
    """The KEYS every occupancy script starts with."""
    lanes = [lane_key(partition, lane) for lane in range(LANES)]
    return [
        occupied_key(partition),
        vacating_key(partition),
        index_key(partition),
        numbers_key(partition),
        *lanes,
    ]


# What the three scripts share. KEYS[1..4] = occupied, vacating, index, numbers;
# KEYS[5..4+LANES] = the lanes. A presence field is "<count> <deadline ms>".
_LIBRARY = f"""
local LANES = {LANES}
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)

local function emit(kind, channel, at)
  local lane = tonumber(string.sub(redis.sha1hex(channel), 1, 6), 16) % LANES
  local number = redis.call('HINCRBY', KEYS[4], lane, 1)
  redis.call('XADD', KEYS[5 + lane], 'MAXLEN', '~', {LANE_MAXLEN}, '*',
    'type', kind, 'channel', channel, 'time', at, 'n', number)
end

-- The latest deadline of a presence hash's live fields (nil: none); lapsed fields are removed.
local function live_until(key)
  local fields = redis.call('HGETALL', key)
  local latest = nil
  for i = 1, #fields, 2 do
    local deadline = tonumber(string.match(fields[i + 1], '^%d+ (%d+)$'))
    if deadline and deadline >= now then
      if latest == nil or deadline > latest then latest = deadline end
    else
      redis.call('HDEL', key, fields[i])
    end
  end
  return latest
end

-- A channel that had no live stream since `since` and has one now.
local function back(channel, since, delay)
  if since + delay <= now then
    emit('{VACATED}', channel, since + delay)
    emit('{OCCUPIED}', channel, now)
  end
end

-- The channel has no live stream any more (since `since`): vacating, or vacated if already due.
local function empty(channel, since, delay)
  redis.call('ZREM', KEYS[1], channel)
  if since + delay <= now then
    redis.call('ZREM', KEYS[3], channel)
    emit('{VACATED}', channel, since + delay)
  else
    redis.call('ZADD', KEYS[2], since + delay, channel)
  end
end
"""

# KEYS = header, then the presence hashes of one partition's channels.
# ARGV[1] = worker id, ARGV[2] = TTL (ms), ARGV[3] = vacated delay (ms), then
# per key: its channel and this worker's stream count on it (> 0).
# No `allow-oom`: refused as a whole, before any write, when Redis is full.
WRITE = Script(
    "#!lua\n"
    + _LIBRARY
    + f"""
local delay = tonumber(ARGV[3])
local deadline = now + tonumber(ARGV[2])
for i = {HEADER} + 1, #KEYS do
  local channel = ARGV[4 + 2 * (i - {HEADER} - 1)]
  local count = ARGV[5 + 2 * (i - {HEADER} - 1)]
  local score = redis.call('ZSCORE', KEYS[1], channel)
  if score then
    -- Occupied, unless every stream lapsed and no sweep has run since.
    score = tonumber(score)
    if score < now and not live_until(KEYS[i]) then back(channel, score, delay) end
  else
    local due = redis.call('ZSCORE', KEYS[2], channel)
    if due then
      redis.call('ZREM', KEYS[2], channel)
      back(channel, tonumber(due) - delay, delay)
    else
      emit('{OCCUPIED}', channel, now)
      redis.call('ZADD', KEYS[3], 0, channel)
    end
  end
  redis.call('HSET', KEYS[i], ARGV[1], count .. ' ' .. deadline)
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('ZADD', KEYS[1], 'GT', deadline, channel)
end
return #KEYS - {HEADER}
"""
)

# KEYS = header, then the presence hashes of channels where this worker has no
# stream any more. ARGV[1] = worker id, ARGV[2] = vacated delay (ms), then one
# channel per key. Allowed when Redis is full: it adds at most one member per
# channel to `vacating`, and frees the presence field.
FORGET = Script(
    "#!lua flags=allow-oom\n"
    + _LIBRARY
    + f"""
local delay = tonumber(ARGV[2])
for i = {HEADER} + 1, #KEYS do
  local channel = ARGV[2 + i - {HEADER}]
  redis.call('HDEL', KEYS[i], ARGV[1])
  if redis.call('ZSCORE', KEYS[1], channel) then
    local latest = live_until(KEYS[i])
    if latest then
      redis.call('ZADD', KEYS[1], latest, channel)
    else
      empty(channel, now, delay)
    end
  end
end
return #KEYS - {HEADER}
"""
)

# KEYS = header, then the presence hashes of the occupied candidates.
# ARGV[1] = vacated delay (ms), ARGV[2] = number of occupied candidates (one
# per presence key), then those channels, then vacating candidates.
# Candidates come from a read just before (see `candidates`); each is checked
# again here against Redis's clock, so a stale or early one changes nothing.
# Returns the number of vacated events written.
SWEEP = Script(
    "#!lua\n"
    + _LIBRARY
    + f"""
local delay = tonumber(ARGV[1])
local occupied = tonumber(ARGV[2])
local sent = 0
for i = 1, occupied do
  local channel = ARGV[2 + i]
  local score = redis.call('ZSCORE', KEYS[1], channel)
  if score and tonumber(score) < now then
    local latest = live_until(KEYS[{HEADER} + i])
    if latest then
      redis.call('ZADD', KEYS[1], latest, channel)
    else
      empty(channel, tonumber(score), delay)
      if tonumber(score) + delay <= now then sent = sent + 1 end
    end
  end
end
for i = 3 + occupied, #ARGV do
  local channel = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[2], channel)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[2], channel)
    redis.call('ZREM', KEYS[3], channel)
    emit('{VACATED}', channel, tonumber(due))
    sent = sent + 1
  end
end
return sent
"""
)
