"""Occupancy on real Redis, one server and a cluster: the stream service's
presence writes (stream/presence.py with webhooks on) and the dispatcher's
sweep (dispatcher/sweeper.py) turn streams coming and going into
`channel.occupied` / `channel.vacated` events that strictly alternate per
channel, one pair per real transition, with the vacated delay honoured and a
dead worker's streams counted as gone after the presence TTL.

The workers here are Presence objects driven by hand (what the hub's clock
does once a second), so each test says exactly when streams come and go.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from dispatcher import occupancy as dispatcher_occupancy
from dispatcher.sweeper import sweep
from redis.cluster import RedisCluster
from stream import occupancy
from stream.contract import partition_of
from stream.presence import Presence

from tests.support.cluster import Cluster
from tests.support.services import eventually

TTL = 1.5  # presence TTL, seconds (the hub refreshes every TTL/3)
DELAY = 0.6  # vacated delay, seconds
SHORT = 0.1  # clearly shorter than DELAY
LONG = DELAY + 0.5  # clearly longer


@dataclass
class Engine:
    client: redis.Redis | RedisCluster
    partitions: int

    def worker(self, ttl: float = TTL, delay: float | None = DELAY) -> Presence:
        return Presence(lambda: self.client, ttl, delay)

    def events(self, channel: str) -> list[tuple[str, int]]:
        """The channel's events so far, in order: (type, time ms)."""
        p = partition_of(channel, self.partitions)
        found, lanes = [], set()
        for lane in range(occupancy.LANES):
            entries: Any = self.client.xrange(occupancy.lane_key(p, lane))
            for entry, fields in entries:
                if fields[b"channel"].decode() == channel:
                    found.append((entry, fields[b"type"].decode(), int(fields[b"time"])))
                    lanes.add(lane)
        assert len(lanes) <= 1, f"{channel}'s events in lanes {lanes}: one lane per channel"
        found.sort(key=lambda f: tuple(map(int, f[0].decode().split("-"))))
        return [(kind, at) for _, kind, at in found]

    def sweep(self, channel: str) -> bool:
        """One sweep of the channel's partition; True (to be used inside `eventually`)."""
        sweep(self.client, partition_of(channel, self.partitions), DELAY)
        return True

    def kinds(self, channel: str) -> list[str]:
        return [kind.removeprefix("channel.") for kind, _ in self.events(channel)]


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "standalone":
        client: redis.Redis | RedisCluster = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield Engine(client, 1)
    else:
        cluster: Cluster = request.getfixturevalue("redis_cluster")
        cluster.wait_healthy(timeout=60)
        client = cluster.client()
        yield Engine(client, 16)
    client.close()


def fresh(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}-{random.randrange(10**6)}"


def test_the_twins_are_one_contract() -> None:
    assert dispatcher_occupancy.WRITE.sha == occupancy.WRITE.sha
    assert dispatcher_occupancy.SWEEP.sha == occupancy.SWEEP.sha


def test_first_stream_occupies_and_the_last_vacates_after_the_delay(engine: Engine) -> None:
    channel = fresh("first")
    p = partition_of(channel, engine.partitions)
    a = engine.worker()
    a.sync({(p, channel): 2})
    assert engine.kinds(channel) == ["occupied"]
    a.sync({})
    engine.sweep(channel)
    assert engine.kinds(channel) == ["occupied"], "vacated before its delay"
    left = time.time() * 1000
    assert eventually(lambda: (engine.sweep(channel), engine.kinds(channel))[1] == ["occupied", "vacated"], 5)
    vacated_at = engine.events(channel)[1][1]
    assert left + DELAY * 1000 - 100 <= vacated_at <= left + DELAY * 1000 + 500


def test_a_reload_within_the_delay_sends_nothing(engine: Engine) -> None:
    channel = fresh("reload")
    p = partition_of(channel, engine.partitions)
    a = engine.worker()
    a.sync({(p, channel): 1})
    a.sync({})
    time.sleep(SHORT)
    engine.sweep(channel)
    a.sync({(p, channel): 1})  # back, on the same worker
    b = engine.worker()
    a.sync({})
    b.sync({(p, channel): 1})  # and moved to another, at once
    time.sleep(LONG)
    engine.sweep(channel)
    assert engine.kinds(channel) == ["occupied"]


def test_many_workers_make_one_pair(engine: Engine) -> None:
    channel = fresh("many")
    p = partition_of(channel, engine.partitions)
    workers = [engine.worker() for _ in range(3)]
    for w in workers:
        w.sync({(p, channel): 5})
    for w in workers[:-1]:
        w.sync({})
        time.sleep(LONG / 2)
    engine.sweep(channel)
    assert engine.kinds(channel) == ["occupied"], "vacated while a worker still had streams"
    workers[-1].sync({})
    time.sleep(LONG)
    engine.sweep(channel)
    assert engine.kinds(channel) == ["occupied", "vacated"]


def test_a_dead_worker_counts_as_gone_after_ttl_plus_delay(engine: Engine) -> None:
    channel = fresh("dead")
    p = partition_of(channel, engine.partitions)
    engine.worker().sync({(p, channel): 1})  # and never heard from again
    died = time.time() * 1000
    time.sleep(TTL - 0.3)
    engine.sweep(channel)
    assert engine.kinds(channel) == ["occupied"], "gone before its TTL"
    assert eventually(lambda: (engine.sweep(channel), engine.kinds(channel))[1] == ["occupied", "vacated"], 5)
    vacated_at = engine.events(channel)[1][1]
    expected = died + (TTL + DELAY) * 1000
    assert expected - 300 <= vacated_at <= expected + 500


def test_back_after_the_delay_without_a_sweep_sends_both_in_order(engine: Engine) -> None:
    channel = fresh("back")
    p = partition_of(channel, engine.partitions)
    a = engine.worker()
    a.sync({(p, channel): 1})
    a.sync({})
    time.sleep(LONG)
    a.sync({(p, channel): 1})  # no sweep ran: the write itself owes the vacated
    events = engine.events(channel)
    assert [k for k, _ in events] == [occupancy.OCCUPIED, occupancy.VACATED, occupancy.OCCUPIED]
    assert events[1][1] < events[2][1]


def test_a_lapsed_worker_back_after_the_delay_without_a_sweep(engine: Engine) -> None:
    channel = fresh("lapsed")
    p = partition_of(channel, engine.partitions)
    engine.worker().sync({(p, channel): 1})
    time.sleep(TTL + LONG)
    engine.worker().sync({(p, channel): 1})
    assert engine.kinds(channel) == ["occupied", "vacated", "occupied"]


def test_random_churn_alternates_one_pair_per_transition(engine: Engine) -> None:
    """Three workers join and leave four channels at random, with empty spells
    either clearly shorter or clearly longer than the delay; the events are
    exactly what a model of the channels' occupancy says."""
    rng = random.Random(20261204)
    channels = [fresh(f"churn{i}") for i in range(4)]
    where = {c: partition_of(c, engine.partitions) for c in channels}
    workers = [engine.worker() for _ in range(3)]
    held: list[set[str]] = [set() for _ in workers]
    expected: dict[str, list[str]] = {c: [] for c in channels}
    occupied = dict.fromkeys(channels, False)  # in the model: streams now
    owed = dict.fromkeys(channels, False)  # occupied was sent and vacated was not

    def sync(i: int) -> None:
        workers[i].sync({(where[c], c): 1 for c in held[i]})

    for _ in range(12):
        for _ in range(rng.randint(1, 4)):
            i, c = rng.randrange(3), rng.choice(channels)
            held[i].symmetric_difference_update({c})
            sync(i)
            now_occupied = any(c in h for h in held)
            if now_occupied and not owed[c]:
                expected[c].append("occupied")
                owed[c] = True
            occupied[c] = now_occupied
        pause = rng.choice([SHORT, LONG])
        time.sleep(pause)
        for c in channels:
            engine.sweep(c)
            if pause == LONG and owed[c] and not occupied[c]:
                expected[c].append("vacated")
                owed[c] = False
    for i in range(3):
        held[i].clear()
        sync(i)
    time.sleep(LONG)
    for c in channels:
        engine.sweep(c)
        if owed[c]:
            expected[c].append("vacated")
    for c in channels:
        assert engine.kinds(c) == expected[c], c
        kinds = engine.kinds(c)
        assert all(a != b for a, b in itertools.pairwise(kinds)), "not alternating"


def test_the_index_lists_occupied_and_vacating_channels(engine: Engine) -> None:
    channel = fresh("index")
    p = partition_of(channel, engine.partitions)
    a = engine.worker()
    a.sync({(p, channel): 1})
    index = occupancy.index_key(p)
    assert engine.client.zscore(index, channel) == 0
    a.sync({})
    assert engine.client.zscore(index, channel) == 0, "vacating is still occupied until vacated"
    time.sleep(LONG)
    engine.sweep(channel)
    assert engine.client.zscore(index, channel) is None
    assert engine.client.zscore(occupancy.occupied_key(p), channel) is None
    assert engine.client.zscore(occupancy.vacating_key(p), channel) is None


def test_with_webhooks_off_nothing_is_kept(engine: Engine) -> None:
    channel = fresh("off")
    p = partition_of(channel, engine.partitions)
    a = engine.worker(delay=None)
    a.sync({(p, channel): 1})
    a.sync({})
    assert engine.events(channel) == []
    assert engine.client.zscore(occupancy.index_key(p), channel) is None
