"""The publisher's side of the Redis contract (docs/redis-contract.md, version 2).

Channels are grouped in partitions (crc32 of the name, mod PARTITIONS), and
every key of partition p carries the hash tag `{p<p>}`, so that one partition's
keys share a Redis Cluster slot. One Lua script per partition a request touches
stores that partition's events: it appends each event to its channel's history
stream and announces it on the channel's sharded Pub/Sub channel, in one atomic
round trip, so no subscriber can see a live event that history lacks. The
partitions of a request are stored one after the other, in the order in which
the request first names them; a failure after some of them were stored is
reported per event (PartiallyStored).

Over Redis's `maxmemory`, Redis refuses a partition's script as a whole
(redis.exceptions.OutOfMemoryError), so nothing of it is stored. With a
history TTL, each script also records when each channel's history expires, and
sweeps a bounded number of channels whose history has expired out of the
channel index (docs/redis-contract.md, "Expired channels").
"""

from __future__ import annotations

import hashlib
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis
import redis.connection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)

from .validation import Event

Connection = redis.connection.ConnectionInterface
T = TypeVar("T")


def partition_of(channel: str, partitions: int) -> int:
    """The channel's partition: CRC-32 (zlib, IEEE 802.3) of its name, mod P."""
    return zlib.crc32(channel.encode()) % partitions


def key_prefix(partition: int) -> str:
    """The start of every key of a partition, hash tag included: `herald:{p3}:`."""
    return f"herald:{{p{partition}}}:"


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

PARTITIONS_ERROR = "HERALD_PARTITIONS "


# KEYS[1] = a channel's presence hash: field per stream worker, value
# "<streams> <deadline ms>" (Redis's clock). Returns the streams of the
# workers whose deadline has not passed (a dead worker's count lapses).
PRESENCE_LUA = """#!lua flags=no-writes
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 2, #fields, 2 do
  local count, deadline = string.match(fields[i], '^(%d+) (%d+)$')
  if count and tonumber(deadline) >= ms then total = total + tonumber(count) end
end
return total
"""
PRESENCE_SHA = hashlib.sha1(PRESENCE_LUA.encode()).hexdigest()


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
    """An Idempotency-Key, the fingerprint of its request, and how long it holds.

    `key` is `<caller>:<Idempotency-Key>`; each partition's record is
    `herald:{p<p>}:idem:<key>`.
    """

    key: str
    fingerprint: str
    window_seconds: int


class KeyReused(Exception):
    """An Idempotency-Key seen before with a different request."""


class PartitionsMismatch(Exception):
    """Redis holds data written with another PARTITIONS than this publisher's."""

    def __init__(self, stored: str, configured: int) -> None:
        super().__init__(
            f"Redis holds data written with PARTITIONS={stored}, this publisher is configured "
            f"with PARTITIONS={configured}: both services must use the value the data was "
            "written with (changing it means starting from empty data)"
        )
        self.stored = stored
        self.configured = configured


@dataclass(frozen=True)
class Published:
    """The outcome of a publish: the stored events, whether it was a replay, and
    how many events this call stored (the rest were stored by an earlier request
    with the same Idempotency-Key)."""

    events: list[Stored]
    replayed: bool
    new: int = 0


class NotReplicated(Exception):
    """Stored on the primary, but fewer replicas than required confirmed it in time."""

    def __init__(self, published: Published, acked: int, wanted: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas confirmed the write")
        self.published = published
        self.acked = acked
        self.wanted = wanted


class PartiallyStored(Exception):
    """Some partitions of a request were stored, then another one failed.

    `events` has, per event of the request in order, its Stored or None. With
    `unknown` (the failure was a timeout) the events without a Stored may have
    been stored after all; otherwise they were not.
    """

    def __init__(self, events: list[Stored | None], cause: BaseException) -> None:
        stored = sum(e is not None for e in events)
        super().__init__(f"{stored} of {len(events)} events stored, then: {cause}")
        self.events = events
        self.cause = cause
        self.unknown = isinstance(cause, redis.TimeoutError)


class Topology(Protocol):
    """Which Redis server holds a key, and new connections to it."""

    # Tries of one partition's command: on a broken connection, and in a
    # cluster on a redirection or during a failover.
    attempts: int
    cluster: bool

    def address(self, key: str) -> str:
        """The server holding `key` (its primary)."""

    def connection(self, address: str) -> Connection:
        """A new connection to that server (connected on first use)."""

    def refresh(self) -> None:
        """Learn the cluster's slots again (after a redirection or a lost node)."""


class Standalone:
    """One Redis server: every key lives there."""

    attempts = 2  # one reconnect, on a broken connection only
    cluster = False

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def address(self, key: str) -> str:
        return ""

    def connection(self, address: str) -> Connection:
        return self._client.connection_pool.make_connection()

    def refresh(self) -> None:
        pass


class Cluster:
    """A Redis Cluster. redis-py's cluster client is used for its map of slots to
    nodes only; commands go over the store's own connections to each node.

    The client is made on first use, so that the service starts (and answers
    /healthz) while the cluster is unreachable.
    """

    attempts = 3
    cluster = True

    def __init__(self, url: str, timeout_seconds: float) -> None:
        redis.connection.parse_url(url)  # a malformed URL fails now, as for one server
        self._url = url
        self._timeout = timeout_seconds
        self._client: redis.RedisCluster | None = None

    def _topology(self) -> redis.RedisCluster:
        if self._client is None:
            try:
                self._client = redis.RedisCluster.from_url(
                    self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
                )
            except RedisClusterException as exc:
                raise redis.ConnectionError(f"the Redis Cluster cannot be reached: {exc}") from exc
        return self._client

    def address(self, key: str) -> str:
        try:
            return str(self._topology().get_node_from_key(key).name)
        except RedisClusterException as exc:  # a slot no node serves
            raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc

    def connection(self, address: str) -> Connection:
        topology = self._topology()
        node = topology.get_node(node_name=address)
        if node is None:
            self.refresh()
            node = topology.get_node(node_name=address)
            if node is None:
                raise redis.ConnectionError(f"Redis Cluster: no node {address}")
        try:
            # The node's client knows the settings (timeouts, credentials, TLS).
            pool = topology.get_redis_connection(node).connection_pool
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc
        return pool.make_connection()

    def refresh(self) -> None:
        try:
            self._topology().nodes_manager.initialize()
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"the Redis Cluster cannot be reached: {exc}") from exc


class _Session:
    """The connections one request uses, one per server, held until it ends.

    WAIT covers the earlier writes of the connection it is sent on, so a
    request keeps its connection to each server: one WAIT per server at the
    end covers every partition it stored there.
    """

    __slots__ = ("conns", "unconfirmed")

    def __init__(self) -> None:
        self.conns: dict[str, Connection] = {}
        # A connection that carried this request's writes broke: WAIT on its
        # replacement would not cover them.
        self.unconfirmed = False


@dataclass(frozen=True)
class _Keys:
    """The key names of one partition."""

    meta: str
    channels: str
    stream: str  # + channel
    idempotency: str  # + <caller>:<key>
    live: str  # + channel (sharded Pub/Sub)
    expiries: str

    @classmethod
    def of(cls, partition: int) -> _Keys:
        prefix = key_prefix(partition)
        return cls(
            prefix + "meta",
            prefix + "channels",
            prefix + "stream:",
            prefix + "idem:",
            prefix + "live:",
            prefix + "expiries",
        )


def _command(*args: str | int) -> Callable[[Connection, bool], Any]:
    def run(conn: Connection, asking: bool) -> Any:
        if asking:
            conn.send_command("ASKING")
            conn.read_response()
        conn.send_command(*args)
        return conn.read_response()

    return run


class EventStore:
    """Writes events to Redis following the contract.

    Scripts are sent on connections of the store's own (per server), straight
    through redis-py's `Connection` (hiredis parses the reply): a publish is one
    EVALSHA per partition and this path skips what the client adds to each
    command (pool checkout with a readiness poll, retry wrappers, observability
    hooks), which cost more CPU than the command itself. The rules stay the
    client's (`make_redis`): a broken connection is reconnected and the command
    retried once, a timeout never is (the script may have run), and a
    connection that failed in any way is closed before it is used again. In a
    cluster, a MOVED or ASK redirection (the command did not run) and a
    failover in progress (CLUSTERDOWN, TRYAGAIN, a node gone) are retried too,
    after the slots are learnt again: at most 3 tries within REDIS_TIMEOUT_SECONDS.
    """

    def __init__(
        self,
        topology: Topology,
        history_maxlen: int,
        history_ttl_seconds: int = 0,
        *,
        partitions: int = 1,
        wait_replicas: int = 0,
        wait_timeout_seconds: float = 0.5,
        redis_timeout_seconds: float = 2.0,
    ) -> None:
        self._topology = topology
        self._maxlen = history_maxlen
        self._ttl = history_ttl_seconds
        self._partitions = partitions
        self._timeout = redis_timeout_seconds
        # With replicas to wait for: WAIT after the scripts, on their connections
        # (WAIT covers the writes of the connection it is sent on).
        self._wait = ("WAIT", wait_replicas, max(1, round(wait_timeout_seconds * 1000)))
        self._sha = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()
        self._keys = [_Keys.of(p) for p in range(partitions)]
        # Idle connections per server, last used first; one per publish in flight at most.
        self._idle: dict[str, list[Connection]] = {}
        # The epoch each partition's script sets if Redis has none. It is drawn
        # again once it has been used (or may have been: a failed script), so an
        # epoch is never set twice, and a publish does not pay for randomness
        # from the OS.
        self._candidates = [new_epoch() for _ in range(partitions)]
        # Whether every partition's meta was found free of another P (once per process).
        self._checked = False

    # -- connections -------------------------------------------------------------

    def _release(self, session: _Session) -> None:
        for address, conn in session.conns.items():
            self._idle.setdefault(address, []).append(conn)
        session.conns.clear()

    def _route(self, partition: int, session: _Session, run: Callable[[Connection, bool], T]) -> T:
        """Run `run` on a connection to the server of `partition`, with the retry rules."""
        topology = self._topology
        key = self._keys[partition].meta
        deadline = time.monotonic() + self._timeout
        redirect: str | None = None  # the server a MOVED or ASK named
        asking = False
        attempt = 0
        while True:
            attempt += 1
            address = topology.address(key) if redirect is None else redirect
            conn = session.conns.pop(address, None)
            carried_writes = conn is not None
            if conn is None:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else topology.connection(address)
            try:
                result = run(conn, asking)
            except redis.ConnectionError:
                # A socket left over from a restart, or (cluster) a node gone:
                # reconnect, to the slot's server as the cluster sees it now.
                conn.disconnect()
                self._idle.setdefault(address, []).append(conn)
                session.unconfirmed = session.unconfirmed or carried_writes
                if attempt >= topology.attempts or time.monotonic() >= deadline:
                    raise
                redirect, asking = None, False
                topology.refresh()
                continue
            except (AskError, ClusterDownError, TryAgainError) as exc:
                # A reply like any other: the connection is in step and kept.
                session.conns[address] = conn
                if not topology.cluster or attempt >= topology.attempts or time.monotonic() >= deadline:
                    raise
                if isinstance(exc, MovedError):
                    # The command did not run: the slot has moved (a failover).
                    redirect, asking = f"{exc.host}:{exc.port}", False
                    topology.refresh()
                elif isinstance(exc, AskError):
                    # The slot is being migrated: this one command goes to the
                    # target, after ASKING.
                    redirect, asking = f"{exc.host}:{exc.port}", True
                else:
                    # A failover in progress: give it a moment.
                    redirect, asking = None, False
                    time.sleep(min(0.05 * attempt, max(0.0, deadline - time.monotonic())))
                    topology.refresh()
                continue
            except BaseException:
                # A timeout, a script error, a killed greenlet: a reply may still be
                # on its way, so this connection is not reused as it is.
                conn.disconnect()
                self._idle.setdefault(address, []).append(conn)
                session.unconfirmed = session.unconfirmed or carried_writes
                raise
            session.conns[address] = conn
            return result

    def _confirmations(self, session: _Session) -> int:
        """WAIT on every connection of the request; the fewest replicas any confirmed."""
        wanted = self._wait[1]
        acked = 0 if session.unconfirmed else wanted
        conns = list(session.conns.values())
        try:
            for conn in conns:
                conn.send_command(*self._wait)
            for conn in conns:
                acked = min(acked, int(conn.read_response()))
        except redis.RedisError:
            # The events are stored; that replicas have them cannot be confirmed.
            for conn in conns:
                conn.disconnect()
            return 0
        except BaseException:
            for conn in conns:
                conn.disconnect()
            raise
        return acked

    # -- publishing ----------------------------------------------------------------

    def _script(
        self, partition: int, events: Sequence[Event], idempotency: Idempotency | None, session: _Session
    ) -> tuple[str, list[int], bool]:
        """Store one partition's events: (epoch, seqs, replayed)."""
        names = self._keys[partition]
        # Without a key, KEYS[3] is unused: the meta hash again, a key that
        # exists. (During a slot migration, Redis runs a command on several
        # keys only where all of them exist, TRYAGAIN otherwise.)
        record = names.idempotency + idempotency.key if idempotency else names.meta
        # Likewise KEYS[4] without a TTL (no expiries are kept then).
        expiries = names.expiries if self._ttl else names.meta
        stream = names.stream
        keys = [names.meta, names.channels, record, expiries, *[stream + e.channel for e in events]]
        candidate = self._candidates[partition]
        args: list[str | int] = [candidate, self._maxlen, self._ttl]
        args += [idempotency.fingerprint, idempotency.window_seconds] if idempotency else ["", 0]
        args += [self._partitions, names.live, stream, SWEEP_LIMIT]
        for e in events:
            args += [e.channel, e.event, e.data]
        command = (len(keys), *keys, *args)

        def run(conn: Connection, asking: bool) -> Any:
            if asking:
                conn.send_command("ASKING")
                conn.read_response()
            conn.send_command("EVALSHA", self._sha, *command)
            try:
                return conn.read_response()
            except NoScriptError:
                if asking:
                    conn.send_command("ASKING")
                    conn.read_response()
                conn.send_command("EVAL", PUBLISH_LUA, *command)
                return conn.read_response()

        try:
            epoch_b, seqs, prior = self._route(partition, session, run)
        except redis.ResponseError as exc:
            self._candidates[partition] = new_epoch()
            message = str(exc)
            if message.startswith(PARTITIONS_ERROR):
                raise PartitionsMismatch(message[len(PARTITIONS_ERROR) :], self._partitions) from None
            raise
        except BaseException:
            self._candidates[partition] = new_epoch()  # the script may have set it
            raise
        epoch = epoch_b.decode()
        if epoch == candidate:
            self._candidates[partition] = new_epoch()
        replayed = bool(prior)
        # (A record of another number of events is of another request too.)
        if replayed and idempotency and (prior.decode(), len(seqs)) != (idempotency.fingerprint, len(events)):
            raise KeyReused(idempotency.key)
        return epoch, seqs, replayed

    def _check_partitions(self) -> None:
        """Refuse data of another P before writing anything.

        Each script checks its own partition's meta, but a partition the data
        never used has none yet: a publisher with another P would store events
        there before meeting a partition that refuses it. So, until it has
        passed once, every partition's meta is checked first.
        """
        session = _Session()
        try:
            for p, names in enumerate(self._keys):
                try:
                    stored = self._route(p, session, _command("HGET", names.meta, "partitions"))
                except redis.ResponseError as exc:
                    if str(exc).startswith("WRONGTYPE"):
                        continue  # that partition's script fails on its own
                    raise
                if stored is not None and stored != str(self._partitions).encode():
                    raise PartitionsMismatch(stored.decode(errors="replace"), self._partitions)
        finally:
            self._release(session)
        self._checked = True

    def publish(self, events: Sequence[Event], idempotency: Idempotency | None = None) -> Published:
        """Store and announce `events`, in order per partition; return their ids.

        With an Idempotency-Key seen within its window, a partition's events are
        not stored again: its first answer is returned (KeyReused if the request
        differs). PartiallyStored if a partition fails after others were stored.
        With replicas to wait for, NotReplicated if fewer confirmed in time.
        """
        if not self._checked:
            self._check_partitions()
        partition = 0
        if self._partitions > 1:
            groups: dict[int, list[int]] = {}
            for i, e in enumerate(events):
                groups.setdefault(partition_of(e.channel, self._partitions), []).append(i)
            if len(groups) > 1:
                return self._publish_partitions(events, groups, idempotency)
            (partition,) = groups
        # One partition (every request when P = 1): one script, all or nothing.
        session = _Session()
        try:
            epoch, seqs, replayed = self._script(partition, events, idempotency, session)
            acked = self._confirmations(session) if self._wait[1] else 0
        finally:
            self._release(session)
        stored = [Stored(f"{epoch}-{seq}", e.channel) for e, seq in zip(events, seqs, strict=True)]
        return self._replicated(Published(stored, replayed, 0 if replayed else len(events)), acked)

    def _publish_partitions(
        self, events: Sequence[Event], groups: dict[int, list[int]], idempotency: Idempotency | None
    ) -> Published:
        """A request over several partitions: one script each, in the order of `groups`."""
        stored: list[Stored | None] = [None] * len(events)
        # A replay only if every partition answered from its record: a retry of
        # a partially stored batch stores the rest, which is not a replay (no
        # Idempotent-Replayed header). With one partition, as before.
        replayed = True
        new = 0
        session = _Session()
        try:
            if idempotency:
                self._check_fingerprints(groups, idempotency, session)
            for p, indices in groups.items():
                part = [events[i] for i in indices]
                try:
                    epoch, seqs, again = self._script(p, part, idempotency, session)
                except (redis.RedisError, KeyReused, PartitionsMismatch) as exc:
                    if any(s is not None for s in stored):
                        raise PartiallyStored(stored, exc) from exc
                    raise
                for i, seq in zip(indices, seqs, strict=True):
                    stored[i] = Stored(f"{epoch}-{seq}", events[i].channel)
                replayed = replayed and again
                new += 0 if again else len(indices)
            acked = self._confirmations(session) if self._wait[1] else 0
        finally:
            self._release(session)
        return self._replicated(Published([s for s in stored if s is not None], replayed, new), acked)

    def _replicated(self, published: Published, acked: int) -> Published:
        if acked < self._wait[1]:
            raise NotReplicated(published, acked, self._wait[1])
        return published

    def _check_fingerprints(
        self, groups: dict[int, list[int]], idempotency: Idempotency, session: _Session
    ) -> None:
        """KeyReused before anything is stored, if any partition's record is of another request.

        (A record written between this check and its partition's script, by a
        concurrent request with the same key, still fails the script: then the
        request is PartiallyStored if an earlier partition was stored.)
        """
        for p in groups:
            record = self._keys[p].idempotency + idempotency.key
            prior = self._route(p, session, _command("HGET", record, "fingerprint"))
            if prior is not None and prior.decode() != idempotency.fingerprint:
                raise KeyReused(idempotency.key)

    def subscribers(self, channel: str) -> int:
        """Streams subscribed to `channel` now, over every stream worker (presence)."""
        partition = partition_of(channel, self._partitions)
        key = key_prefix(partition) + "presence:" + channel

        def run(conn: Connection, asking: bool) -> Any:
            try:
                return _command("EVALSHA", PRESENCE_SHA, 1, key)(conn, asking)
            except NoScriptError:
                return _command("EVAL", PRESENCE_LUA, 1, key)(conn, asking)

        session = _Session()
        try:
            return int(self._route(partition, session, run))
        finally:
            self._release(session)

    def ping(self) -> bool:
        """True when every server holding a partition answers."""
        session = _Session()
        seen: set[str] = set()
        try:
            for p, names in enumerate(self._keys):
                address = self._topology.address(names.meta)
                if address not in seen:
                    seen.add(address)
                    self._route(p, session, _command("PING"))
        finally:
            self._release(session)
        return True
