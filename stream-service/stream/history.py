"""Resume from history: the stream service's read side of the Redis contract.

One read-only Lua script returns, atomically, the current epoch and sequence
number and, for each channel, the events after a position together with the
highest id that trimming has removed. From that we either replay exactly the
missed events, merged across channels in publish order, or tell the client to
reset (docs/redis-contract.md, "Reading history").
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Sequence
from typing import Any

import redis

from .core import HistoryEvent, Position, Replay

META_KEY = "herald:meta"
CHANNELS_KEY = "herald:channels"
STREAM_PREFIX = "herald:stream:"

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


# KEYS[1] = meta hash; ARGV[1] = candidate epoch, ARGV[2] = the worker's epoch
# ('' before its first connection), ARGV[3] = the last seq it dispatched.
META_LUA = """
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local seq = tonumber(meta[2] or '0')
if meta[1] == ARGV[2] and seq < tonumber(ARGV[3]) then
  -- Events this worker dispatched are gone (a failover to a replica that lagged):
  -- a new epoch begins, so that the numbers given out next never repeat an id.
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  meta[1] = ARGV[1]
end
return {meta[1], seq}
"""


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


class History:
    """Reads missed events for a set of channels from Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(READ_LUA)
        self._meta = client.register_script(META_LUA)

    def meta(self, seen: Position | None) -> Position:
        """The current epoch and sequence number, creating the epoch if there is none.

        `seen` is the last position the caller dispatched: if Redis is behind
        it in the same epoch (writes were lost), a new epoch begins first.
        """
        args: list[str | int] = [new_epoch(), seen.epoch, seen.seq] if seen else [new_epoch(), "", 0]
        epoch, seq = self._meta(keys=[META_KEY], args=args)
        return Position(epoch.decode(), int(seq))

    def read(self, channels: Sequence[str], after: Position, *, check: bool = True) -> Replay:
        """Events on `channels` after `after`, in publish order.

        With `check`, a replay that cannot be complete becomes a reset instead:
        another epoch, an unknown (future) position, or trimmed history.
        """
        keys = [META_KEY, CHANNELS_KEY] + [STREAM_PREFIX + c for c in channels]
        raw = self._script(keys=keys, args=[after.seq, *channels])
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
