"""The event store: the publisher's side of the Redis contract (docs/redis-contract.md, version 2).

One script per partition a request touches (scripts.PUBLISH) stores that
partition's events and announces them, in one atomic round trip. The
partitions of a request are stored one after the other, in the order in which
the request first names them; a failure after some of them were stored is
reported per event (PartiallyStored). With an Idempotency-Key, a partition
already stored within the key's window answers from its record instead. With
replicas to wait for (PUBLISH_WAIT_REPLICAS), one WAIT per server at the end
confirms every partition stored there.

Over Redis's `maxmemory`, Redis refuses a partition's script as a whole
(redis.exceptions.OutOfMemoryError), so nothing of it is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from .config import Config
from .contract import Keys, new_epoch, partition_of
from .routing import Router, Session, Topology, command, make_topology
from .scripts import PARTITIONS_ERROR, PRESENCE, PUBLISH, SUBSCRIBERS, SWEEP_LIMIT
from .validation import Event


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


@dataclass(frozen=True)
class Published:
    """The outcome of a publish: the stored events, whether it was a replay, and
    how many events this call stored (the rest were stored by an earlier request
    with the same Idempotency-Key)."""

    events: list[Stored]
    replayed: bool
    new: int = 0


@dataclass(frozen=True)
class Occupied:
    """A page of the occupancy index: (channel, live subscribers), by partition
    then name, and where the next page starts, (partition, the channel after
    which; "" for the partition's first), or None when nothing is left."""

    channels: list[tuple[str, int]]
    next: tuple[int, str] | None


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


class EventStore:
    """Writes events to Redis following the contract, through a Router (routing.py)."""

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
        self._router = Router(topology, redis_timeout_seconds)
        self._maxlen = history_maxlen
        self._ttl = history_ttl_seconds
        self._partitions = partitions
        # With replicas to wait for: WAIT after the scripts, on their connections
        # (WAIT covers the writes of the connection it is sent on).
        self._wait = ("WAIT", wait_replicas, max(1, round(wait_timeout_seconds * 1000)))
        self._keys = [Keys.of(p) for p in range(partitions)]
        # The epoch each partition's script sets if Redis has none. It is drawn
        # again once it has been used (or may have been: a failed script), so an
        # epoch is never set twice, and a publish does not pay for randomness
        # from the OS.
        self._candidates = [new_epoch() for _ in range(partitions)]
        # Whether every partition's meta was found free of another P (once per process).
        self._checked = False

    @classmethod
    def from_config(cls, config: Config) -> EventStore:
        """The store the settings describe (Redis is reached on first use)."""
        return cls(
            make_topology(config),
            config.history_maxlen,
            config.history_ttl_seconds,
            partitions=config.partitions,
            wait_replicas=config.wait_replicas,
            wait_timeout_seconds=config.wait_timeout_seconds,
            redis_timeout_seconds=config.redis_timeout_seconds,
        )

    # -- publishing ----------------------------------------------------------------

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
        with self._router.session() as session:
            epoch, seqs, replayed = self._script(partition, events, idempotency, session)
            acked = self._confirmations(session) if self._wait[1] else 0
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
        with self._router.session() as session:
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
        return self._replicated(Published([s for s in stored if s is not None], replayed, new), acked)

    def _script(
        self, partition: int, events: Sequence[Event], idempotency: Idempotency | None, session: Session
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
        try:
            epoch_b, seqs, prior = self._router.run(names.meta, session, PUBLISH.step(keys, args))
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
        with self._router.session() as session:
            for names in self._keys:
                try:
                    stored = self._router.run(names.meta, session, command("HGET", names.meta, "partitions"))
                except redis.ResponseError as exc:
                    if str(exc).startswith("WRONGTYPE"):
                        continue  # that partition's script fails on its own
                    raise
                if stored is not None and stored != str(self._partitions).encode():
                    raise PartitionsMismatch(stored.decode(errors="replace"), self._partitions)
        self._checked = True

    def _check_fingerprints(
        self, groups: dict[int, list[int]], idempotency: Idempotency, session: Session
    ) -> None:
        """KeyReused before anything is stored, if any partition's record is of another request.

        (A record written between this check and its partition's script, by a
        concurrent request with the same key, still fails the script: then the
        request is PartiallyStored if an earlier partition was stored.)
        """
        for p in groups:
            names = self._keys[p]
            record = names.idempotency + idempotency.key
            prior = self._router.run(names.meta, session, command("HGET", record, "fingerprint"))
            if prior is not None and prior.decode() != idempotency.fingerprint:
                raise KeyReused(idempotency.key)

    # -- WAIT --------------------------------------------------------------------------

    def _confirmations(self, session: Session) -> int:
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

    def _replicated(self, published: Published, acked: int) -> Published:
        if acked < self._wait[1]:
            raise NotReplicated(published, acked, self._wait[1])
        return published

    # -- reads -------------------------------------------------------------------------

    def subscribers(self, channel: str) -> int:
        """Streams subscribed to `channel` now, over every stream worker (presence)."""
        names = self._keys[partition_of(channel, self._partitions)]
        with self._router.session() as session:
            return int(self._router.run(names.meta, session, PRESENCE.step([names.presence + channel], [])))

    def occupied(self, start: tuple[int, str] | None, limit: int) -> Occupied:
        """Up to `limit` channels of the occupancy index (kept while webhooks are
        on), from `start` (partition, the channel after which; None: the first),
        with their live subscribers.

        Partition by partition, in order: one `ZRANGE … BYLEX` of the index
        (one name more than the page still needs: it tells whether the
        partition holds more),
        then, if it found any, one script summing their presence hashes (KEYS =
        those hashes; every key of a partition is of one slot). Both are routed
        by the partition's meta key. An empty partition costs the one ZRANGE.
        Once the page is full, the partitions after are probed the same way
        (one name each) until one has a channel: the next page starts there, so
        a cursor is given only when something is left to list.

        Not one atomic read: a channel that leaves the index between the two
        steps is listed with 0 subscribers, as is a vacating one (its last
        stream left, its `channel.vacated` not sent yet).
        """
        partition, after = start or (0, "")
        found: list[tuple[str, int]] = []
        with self._router.session() as session:
            while partition < self._partitions:
                names = self._keys[partition]
                want = limit - len(found)
                low = "(" + after if after else "-"
                listing = command("ZRANGE", names.occupancy, low, "+", "BYLEX", "LIMIT", 0, want + 1)
                channels = [c.decode() for c in self._router.run(names.meta, session, listing)]
                page = channels[:want]
                if page:
                    step = SUBSCRIBERS.step([names.presence + c for c in page], [])
                    counts = self._router.run(names.meta, session, step)
                    found += zip(page, map(int, counts), strict=True)
                if len(channels) > want:
                    return Occupied(found, (partition, page[-1] if page else after))
                partition, after = partition + 1, ""
        return Occupied(found, None)

    def ping(self) -> bool:
        """True when every server holding a partition answers."""
        return self._router.ping(names.meta for names in self._keys)
