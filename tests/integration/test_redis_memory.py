"""Redis memory has a ceiling (docs/redis-contract.md, docs/capacity.md).

- A publish Redis refuses for memory (`maxmemory`, `noeviction`) answers 503
  `redis_full` with Retry-After, and stores nothing of that request.
- A channel whose history expired leaves the channel index (and the expiries
  set) at a later publish; the partition's `forgotten` keeps its newest seq.
- Presence writes of the stream service do no harm while Redis is full.

On a Redis of this module's own: these tests fill it, flush it, and raise the
partition's `forgotten`, which would disturb the session's shared Redis.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from tests.conftest import post_events
from tests.support import keys
from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.services import Service, eventually
from tests.support.sse_client import open_stream

META = keys.meta_key("")
CHANNELS = keys.channels_key("")
EXPIRIES = keys.expiries_key("")


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    require_docker("the Redis memory tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        client = redis.Redis.from_url(url)
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
        yield url


@pytest.fixture
def db(own_redis: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(own_redis)
    client.config_set("maxmemory", 0)
    client.flushall()
    yield client
    client.config_set("maxmemory", 0)
    client.flushall()
    client.close()


@pytest.fixture
def start_here(start: Callable[..., Service], own_redis: str) -> Callable[..., Service]:
    def _start(kind: str, **env: str) -> Service:
        return start(kind, redis_url_override=own_redis, **env)

    return _start


def cap(db: redis.Redis, room: int) -> None:
    """A maxmemory `room` bytes above what Redis uses now."""
    db.config_set("maxmemory", int(db.info("memory")["used_memory"]) + room)


def stored_markers(db: redis.Redis) -> set[str]:
    """The `m` of every event's data in every stream."""
    found = set()
    for key in db.scan_iter(match="herald:*:stream:*", count=1000):
        raw: Any = db.xrange(key)
        for _, fields in raw:
            found.add(json.loads(fields[b"data"])["m"])
    return found


def assert_redis_full(answer: requests.Response) -> None:
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Retry-After"] == "2"
    body = answer.json()
    assert set(body) == {"error", "message"} and body["error"] == "redis_full", body


def test_a_full_redis_refuses_whole_publishes_and_every_202_is_in_history(
    start_here: Callable[..., Service], db: redis.Redis
) -> None:
    pub = start_here("publisher")
    post_events(pub.url, {"channel": "warm", "data": {"m": "warm"}})
    cap(db, 400_000)
    accepted: dict[str, str] = {}  # marker -> id
    refused: set[str] = set()
    i = 0
    # Single events and batches of several channels, of a few sizes, until
    # Redis refuses, and on for a few more.
    while len(refused) < 5 and i < 2000:
        i += 1
        size = (200, 2000, 9000)[i % 3]
        body: Any
        if i % 2:
            body = {"channel": f"c{i % 5}", "data": {"m": f"e{i}", "pad": "x" * size}}
            markers = [f"e{i}"]
        else:
            markers = [f"e{i}.{j}" for j in range(4)]
            body = [{"channel": f"c{j}", "data": {"m": m, "pad": "x" * size}} for j, m in enumerate(markers)]
        headers = {"Idempotency-Key": f"k{i}"} if i % 4 == 0 else {}
        answer = post_events(pub.url, body, headers=headers)
        if answer.status_code == 202:
            got = answer.json()
            ids = [e["id"] for e in got["events"]] if isinstance(body, list) else [got["id"]]
            accepted.update(zip(markers, ids, strict=True))
        else:
            assert_redis_full(answer)
            refused.update(markers)
    assert refused, "Redis never refused a publish"
    assert len(accepted) > 20
    stored = stored_markers(db)
    assert set(accepted) <= stored  # every 202 is in history
    assert not refused & stored  # no refused event is
    assert stored == set(accepted) | {"warm"}
    # The counter moved by exactly the accepted events (a refused script wrote nothing).
    assert int(db.hget(META, "seq") or 0) == len(accepted) + 1
    assert "Traceback" not in pub.log()
    # Room again (history expired, or a higher ceiling): publishing resumes.
    db.config_set("maxmemory", 0)
    again = post_events(pub.url, {"channel": "c1", "data": {"m": "after"}})
    assert again.status_code == 202, again.text


def test_a_batch_whose_later_partition_is_refused_names_what_was_stored(
    start_here: Callable[..., Service], db: redis.Redis
) -> None:
    pub = start_here("publisher", PARTITIONS="2")
    first, second = keys.channels_in_distinct_partitions("pp", 2, 2)
    post_events(pub.url, [{"channel": first, "data": {"m": "w1"}}, {"channel": second, "data": {"m": "w2"}}])
    # The first partition's part is a small request (Redis counts a request
    # while it reads it) that fits at its start and stores much more (a new
    # stream per channel), pushing Redis over the ceiling: the second
    # partition's script is then refused as a whole.
    many = keys.channels_in_one_partition(first, 90, 2)
    cap(db, 150_000)
    body = [{"channel": c, "data": {"m": f"a{i}"}} for i, c in enumerate(many)]
    body += [{"channel": second, "data": {"m": f"b{i}"}} for i in range(2)]
    answer = post_events(pub.url, body, headers={"Idempotency-Key": secrets.token_hex(4)})
    assert answer.status_code == 503, answer.text
    got = answer.json()
    assert got["error"] == "partially_stored" and "memory" in got["message"]
    assert answer.headers["Retry-After"] == "2"
    assert [e is not None for e in got["events"]] == [True] * 90 + [False, False]
    assert stored_markers(db) == {"w1", "w2"} | {f"a{i}" for i in range(90)}
    # Nothing of the refused partition either: its counter did not move.
    assert db.hget(keys.meta_key(second, 2), "seq") == b"1"


def test_a_channel_whose_history_expired_leaves_the_index_at_a_later_publish(
    start_here: Callable[..., Service], db: redis.Redis
) -> None:
    pub = start_here("publisher", HISTORY_TTL_SECONDS="1")

    def publish(channel: str, data: Any) -> int:
        answer = post_events(pub.url, {"channel": channel, "data": data})
        assert answer.status_code == 202, answer.text
        return int(answer.json()["id"].rsplit("-", 1)[1])

    a1, b1, a2 = publish("a", 1), publish("b", 2), publish("a", 3)
    now_ms = int(db.time()[0]) * 1000
    raw: Any = db.zrange(EXPIRIES, 0, -1, withscores=True)
    scores = dict(raw)
    assert set(scores) == {b"a", b"b"}
    # Score: Redis's clock (ms) when the history expires, last publish + TTL.
    assert all(now_ms <= score <= now_ms + 2000 for score in scores.values()), (now_ms, scores)
    assert db.hgetall(CHANNELS) == {b"a": str(a2).encode(), b"b": str(b1).encode()}
    assert db.hget(META, "forgotten") is None

    assert eventually(lambda: db.exists(keys.stream_key("a"), keys.stream_key("b")) == 0, timeout=5)
    # Expired, but still indexed until a publish sweeps them.
    assert db.hlen(CHANNELS) == 2
    c1 = publish("c", 4)
    assert db.hgetall(CHANNELS) == {b"c": str(c1).encode()}
    assert db.zrange(EXPIRIES, 0, -1) == [b"c"]
    assert db.hget(META, "forgotten") == str(a2).encode()  # the newest seq of a channel forgotten
    # A channel the index does not hold names `forgotten` as its predecessor:
    # whatever it had before is at most that, so a gap stays detectable.
    entries: Any = db.xrange(keys.stream_key("c"))
    (entry,) = entries
    assert entry[1][b"prev"] == str(a2).encode()
    a3 = publish("a", 5)
    entries = db.xrange(keys.stream_key("a"))
    (entry,) = entries
    assert int(entry[1][b"prev"]) >= a2 > a1
    assert db.hget(CHANNELS, "a") == str(a3).encode()
    # Nothing else of the contract changed: the meta hash has one field more.
    assert set(db.hgetall(META)) == {b"epoch", b"seq", b"partitions", b"forgotten"}
    # `forgotten` never goes down.
    assert eventually(lambda: db.exists(keys.stream_key("c"), keys.stream_key("a")) == 0, timeout=5)
    db.hset(META, "forgotten", 10_000)
    publish("d", 6)
    assert db.hget(META, "forgotten") == b"10000"
    assert set(db.hkeys(CHANNELS)) == {b"d"}


def test_the_sweep_is_bounded_and_rechecks_what_has_not_expired(
    start_here: Callable[..., Service], db: redis.Redis
) -> None:
    pub = start_here("publisher", HISTORY_TTL_SECONDS="3600")
    assert post_events(pub.url, {"channel": "kept", "data": 1}).status_code == 202
    assert post_events(pub.url, {"channel": "forever", "data": 1}).status_code == 202
    # 100 channels whose history is gone, all due; one whose expiry was
    # recorded too early (clock skew); one kept for ever since (no TTL).
    db.hset(CHANNELS, mapping={f"gone.{i}": 1 for i in range(100)})
    db.zadd(EXPIRIES, {f"gone.{i}": i for i in range(100)})
    db.zadd(EXPIRIES, {"kept": 1, "forever": 1})
    db.persist(keys.stream_key("forever"))
    assert post_events(pub.url, {"channel": "x", "data": 1}).status_code == 202
    # 32 entries at most per publish, the earliest first: the two at score 1 among them.
    assert db.hlen(CHANNELS) == 100 + 3 - 30
    left_ms = int(db.pttl(keys.stream_key("kept")))
    now_ms = int(db.time()[0]) * 1000
    score = db.zscore(EXPIRIES, "kept")
    assert score is not None and abs(score - (now_ms + left_ms)) < 2000  # re-scored from its PTTL
    assert db.hexists(CHANNELS, "kept") and db.hexists(CHANNELS, "forever")
    assert db.zscore(EXPIRIES, "forever") is None  # no longer expires: not tracked
    for _ in range(3):
        assert post_events(pub.url, {"channel": "x", "data": 1}).status_code == 202
    assert set(db.hkeys(CHANNELS)) == {b"kept", b"forever", b"x"}
    assert db.hget(META, "forgotten") == b"1"


def test_a_resume_on_a_forgotten_channel_from_before_forgotten_is_a_reset(
    start_here: Callable[..., Service], db: redis.Redis
) -> None:
    """The read side's rule: a channel with no index field has newest = `forgotten`."""
    pub = start_here("publisher", HISTORY_TTL_SECONDS="1")
    stream = start_here("stream", HEARTBEAT_SECONDS="1")
    answer = post_events(pub.url, {"channel": "gone", "data": 1})
    epoch, first = answer.json()["id"].rsplit("-", 1)
    post_events(pub.url, {"channel": "gone", "data": 2})
    assert eventually(lambda: db.exists(keys.stream_key("gone")) == 0, timeout=5)
    post_events(pub.url, {"channel": "other", "data": 3})
    forgotten = int(db.hget(META, "forgotten") or 0)
    assert forgotten == int(first) + 1 and not db.hexists(CHANNELS, "gone")
    before = open_stream(stream.url, ["gone"], last_event_id=f"{epoch}-{first}")
    try:
        (event,) = before.wait_events(1)
        assert event.event == "reset" and event.json() == {"reason": "history_trimmed"}
    finally:
        before.close()
    after = open_stream(stream.url, ["gone"], last_event_id=f"{epoch}-{forgotten}")
    try:
        time.sleep(1.5)
        assert not after.events  # nothing was missed: no reset
    finally:
        after.close()


def subscribers(pub: Service, channel: str) -> int:
    answer = requests.get(f"{pub.url}/channels/{channel}", timeout=5)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["subscribers"])


def test_presence_does_no_harm_while_redis_is_full(
    start_here: Callable[..., Service], db: redis.Redis, channel: str
) -> None:
    pub = start_here("publisher")
    sse = start_here("stream", PRESENCE_TTL_SECONDS="3")
    early = open_stream(sse.url, [channel + ".early"])
    assert eventually(lambda: subscribers(pub, channel + ".early") == 1, timeout=5)
    cap(db, -100_000)  # over the ceiling now
    late = open_stream(sse.url, [channel])
    try:
        assert late.status == 200  # streams are not affected
        time.sleep(2.5)
        assert subscribers(pub, channel) == 0  # its count could not be written
        # Removing a count frees memory: allowed while full.
        early.close()
        assert eventually(lambda: subscribers(pub, channel + ".early") == 0, timeout=2)
        assert_redis_full(post_events(pub.url, {"channel": channel, "data": 1}))
        db.config_set("maxmemory", 0)
        assert eventually(lambda: subscribers(pub, channel) == 1, timeout=5)
        published = post_events(pub.url, {"channel": channel, "data": {"m": "x"}})
        assert published.status_code == 202
        (event,) = late.wait_events(1)
        assert event.id == published.json()["id"]
    finally:
        late.close()
        early.close()
    log = sse.log()
    assert log.count("Redis is full (maxmemory)") == 1, log
    assert "Redis has room again" in log and "Traceback" not in log
