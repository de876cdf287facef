"""The publisher's side of the Redis contract (docs/redis-contract.md).

One Lua script stores a whole request: it appends each event to its channel's
history stream and publishes it on the channel's Pub/Sub channel, in one atomic
round trip, so no subscriber can see a live event that history lacks.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from .validation import Event

META_KEY = "herald:meta"
CHANNELS_KEY = "herald:channels"
STREAM_PREFIX = "herald:stream:"
LIVE_PREFIX = "herald:live:"

# KEYS[1] = meta hash, KEYS[2] = channels hash, KEYS[2+i] = stream of event i.
# ARGV[1] = candidate epoch, ARGV[2] = history maxlen, ARGV[3] = idle TTL (0: none),
# then per event: channel, event name, data.
PUBLISH_LUA = """
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local ttl = tonumber(ARGV[3])
local seqs = {}
for i = 3, #KEYS do
  local a = 4 + (i - 3) * 3
  local channel, event, data = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  local prev = redis.call('HGET', KEYS[2], channel) or '0'
  redis.call('HSET', KEYS[2], channel, seq)
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], seq .. '-0',
             'event', event, 'data', data, 'prev', prev)
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
  redis.call('PUBLISH', 'herald:live:' .. channel, epoch .. ' ' .. seq .. ' ' .. event .. ' ' .. data)
  seqs[#seqs + 1] = seq
end
return {epoch, seqs}
"""


def new_epoch() -> str:
    """A fresh random epoch: 12 lowercase hex digits."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Stored:
    """Where an event landed: its public id and channel."""

    id: str
    channel: str


class EventStore:
    """Writes events to Redis following the contract."""

    def __init__(self, client: redis.Redis, history_maxlen: int, history_ttl_seconds: int = 0) -> None:
        self._client = client
        self._maxlen = history_maxlen
        self._ttl = history_ttl_seconds
        self._script = client.register_script(PUBLISH_LUA)

    def publish(self, events: Sequence[Event]) -> list[Stored]:
        """Store and announce `events` atomically, in order; return their ids."""
        keys = [META_KEY, CHANNELS_KEY] + [STREAM_PREFIX + e.channel for e in events]
        args: list[str | int] = [new_epoch(), self._maxlen, self._ttl]
        for e in events:
            args += [e.channel, e.event, e.data]
        epoch, seqs = self._script(keys=keys, args=args)
        epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
        return [Stored(f"{epoch}-{seq}", e.channel) for e, seq in zip(events, seqs, strict=True)]

    def ping(self) -> bool:
        """True when Redis answers."""
        return bool(self._client.ping())
