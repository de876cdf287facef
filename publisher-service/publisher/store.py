"""The publisher's side of the Redis contract (docs/redis-contract.md).

One Lua script stores a whole request: it appends each event to its channel's
history stream and publishes it on the channel's Pub/Sub channel, in one atomic
round trip, so no subscriber can see a live event that history lacks.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.connection
from redis.exceptions import NoScriptError

from .validation import Event

META_KEY = "herald:meta"
CHANNELS_KEY = "herald:channels"
STREAM_PREFIX = "herald:stream:"
LIVE_PREFIX = "herald:live:"

IDEMPOTENCY_PREFIX = "herald:idem:"

# KEYS[1] = meta hash, KEYS[2] = channels hash, KEYS[3] = idempotency record
# (unused when ARGV[4] is empty), KEYS[3+i] = stream of event i.
# ARGV[1] = candidate epoch, ARGV[2] = history maxlen, ARGV[3] = idle TTL (0: none),
# ARGV[4] = request fingerprint ('' without Idempotency-Key), ARGV[5] = its window (s),
# then per event: channel, event name, data.
# Returns {epoch, {seq...}, ''} or, for a repeated key, {epoch, {seq...}, fingerprint}.
PUBLISH_LUA = """
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
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local ttl = tonumber(ARGV[3])
-- One counter step for the whole request, then per event only XADD and PUBLISH;
-- each channel's newest seq is read and written, and its stream's TTL set,
-- once per request (a batch often holds several events of one channel).
local n = #KEYS - 3
local seq = redis.call('HINCRBY', KEYS[1], 'seq', n) - n
local seqs, newest, channels = {}, {}, {}
for i = 4, #KEYS do
  local a = 6 + (i - 4) * 3
  local channel, event, data = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  seq = seq + 1
  local prev = newest[channel]
  if prev == nil then
    prev = redis.call('HGET', KEYS[2], channel) or '0'
    channels[#channels + 1] = {channel, KEYS[i]}
  end
  newest[channel] = seq
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[2], seq .. '-0',
             'event', event, 'data', data, 'prev', prev)
  redis.call('PUBLISH', 'herald:live:' .. channel, epoch .. ' ' .. seq .. ' ' .. event .. ' ' .. data)
  seqs[#seqs + 1] = seq
end
for _, c in ipairs(channels) do
  redis.call('HSET', KEYS[2], c[1], newest[c[1]])
  if ttl > 0 then redis.call('EXPIRE', c[2], ttl) end
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[4], 'epoch', epoch, 'seqs', table.concat(seqs, ','))
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
return {epoch, seqs, ''}
"""


def new_epoch() -> str:
    """A fresh random epoch: 12 lowercase hex digits."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Stored:
    """Where an event landed: its public id and channel."""

    id: str
    channel: str


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key, the fingerprint of its request, and how long it holds."""

    key: str
    fingerprint: str
    window_seconds: int


class KeyReused(Exception):
    """An Idempotency-Key seen before with a different request."""


@dataclass(frozen=True)
class Published:
    """The outcome of a publish: the stored events, and whether it was a replay."""

    events: list[Stored]
    replayed: bool


class NotReplicated(Exception):
    """Stored on the primary, but fewer replicas than required confirmed it in time."""

    def __init__(self, published: Published, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas confirmed the write")
        self.published = published
        self.acked = acked
        self.wanted = wanted


class EventStore:
    """Writes events to Redis following the contract.

    The script is sent on connections of its own, straight through redis-py's
    `Connection` (hiredis parses the reply): a publish is one EVALSHA and this
    path skips what the client adds to each command (pool checkout with a
    readiness poll, retry wrappers, observability hooks), which cost more CPU
    than the command itself. The rules stay the client's (`make_redis`): a
    broken connection is reconnected and the command retried once, a timeout
    never is (the script may have run), and a connection that failed in any way
    is closed before it is used again.
    """

    def __init__(
        self,
        client: redis.Redis,
        history_maxlen: int,
        history_ttl_seconds: int = 0,
        *,
        wait_replicas: int = 0,
        wait_timeout_seconds: float = 0.5,
    ) -> None:
        self._client = client
        self._maxlen = history_maxlen
        self._ttl = history_ttl_seconds
        # With replicas to wait for: WAIT after the script, on its connection
        # (WAIT covers the writes of the connection it is sent on).
        self._wait = ("WAIT", wait_replicas, max(1, round(wait_timeout_seconds * 1000)))
        self._sha = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
        # Idle connections, last used first; one per publish in flight at most.
        self._idle: list[redis.connection.ConnectionInterface] = []
        # The epoch the script sets if Redis has none. It is drawn again only
        # once it has been used, so an epoch is never set twice, and a publish
        # does not pay for randomness from the OS.
        self._candidate = new_epoch()

    def _call(self, command: tuple[str | int, ...]) -> tuple[Any, int]:
        """Run the script on a pooled connection: EVALSHA, or EVAL if Redis lacks it.

        Returns its reply and, with replicas to wait for, how many confirmed it.
        """
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._client.connection_pool.make_connection()
        try:
            try:
                reply = self._run(conn, command)
            except redis.ConnectionError:
                # A socket left over from a Redis restart: reconnect, once.
                conn.disconnect()
                reply = self._run(conn, command)
        except BaseException:
            # A timeout, a script error, a killed greenlet: a reply may still be
            # on its way, so this connection is not reused as it is.
            conn.disconnect()
            self._idle.append(conn)
            raise
        self._idle.append(conn)
        return reply

    def _run(
        self, conn: redis.connection.ConnectionInterface, command: tuple[str | int, ...]
    ) -> tuple[Any, int]:
        conn.send_command("EVALSHA", self._sha, *command)
        try:
            reply = conn.read_response()
        except NoScriptError:
            conn.send_command("EVAL", PUBLISH_LUA, *command)
            reply = conn.read_response()
        if not self._wait[1]:
            return reply, 0
        conn.send_command(*self._wait)
        return reply, int(conn.read_response())

    def publish(self, events: Sequence[Event], idempotency: Idempotency | None = None) -> Published:
        """Store and announce `events` atomically, in order; return their ids.

        With an Idempotency-Key seen within its window, nothing is stored and
        the first answer is returned again (KeyReused if the request differs).
        With replicas to wait for, NotReplicated if fewer confirmed in time.
        """
        record = IDEMPOTENCY_PREFIX + idempotency.key if idempotency else IDEMPOTENCY_PREFIX
        keys = [META_KEY, CHANNELS_KEY, record] + [STREAM_PREFIX + e.channel for e in events]
        candidate = self._candidate
        args: list[str | int] = [candidate, self._maxlen, self._ttl]
        args += [idempotency.fingerprint, idempotency.window_seconds] if idempotency else ["", 0]
        for e in events:
            args += [e.channel, e.event, e.data]
        (epoch, seqs, prior), acked = self._call((len(keys), *keys, *args))
        epoch = epoch.decode()
        if epoch == candidate:
            self._candidate = new_epoch()
        replayed = bool(prior)
        if replayed and idempotency and prior.decode() != idempotency.fingerprint:
            raise KeyReused(idempotency.key)
        stored = [Stored(f"{epoch}-{seq}", e.channel) for e, seq in zip(events, seqs, strict=True)]
        published = Published(stored, replayed)
        if acked < self._wait[1]:
            raise NotReplicated(published, acked, self._wait[1])
        return published

    def ping(self) -> bool:
        """True when Redis answers."""
        return bool(self._client.ping())
