"""The Python client (clients/python) against the real services: publishing with
retries that never publish twice, and subscribing with exact resume."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from herald_client import AsyncPublisher, Event, HeraldError, Publisher, subscribe

from tests.support import keys
from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.services import Service


def take(events: Iterator[Event], count: int, timeout: float = 15) -> list[Event]:
    """The next `count` events, read in a thread (the iterator blocks), within `timeout`."""
    got: list[Event] = []
    done = threading.Event()

    def run() -> None:
        for event in events:
            got.append(event)
            if len(got) >= count:
                break
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(timeout), f"{len(got)} of {count} events in {timeout} s"
    return got


def test_publish_and_publish_many_answer_the_ids_a_subscriber_sees(
    publisher: Service, stream: Service, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    with Publisher(publisher.url) as pub:
        start = pub.publish(a, {"warm": True})
        events = subscribe(stream.url, [a, b], last_event_id=start)
        first = pub.publish(a, {"id": 17}, event="created")
        batch = pub.publish_many([(a, {"id": 18}, "created"), (b, "x", None)])
        got = take(events, 3)
    assert [(e.id, e.channel, e.event, e.data) for e in got] == [
        (first, a, "created", {"id": 17}),
        (batch[0], a, "created", {"id": 18}),
        (batch[1], b, "message", "x"),
    ]


def test_refusals_raise_herald_error_with_the_services_code(start: Callable[..., Service]) -> None:
    pub = start("publisher", PUBLISH_TOKEN="client-secret")
    with Publisher(pub.url) as anonymous, pytest.raises(HeraldError) as refused:
        anonymous.publish("orders", 1)
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    with Publisher(pub.url, token="client-secret") as allowed:
        with pytest.raises(HeraldError) as bad:
            allowed.publish("not a channel", 1)
        assert bad.value.status == 400 and bad.value.code == "invalid_event"
        assert allowed.publish("orders", 1)


def test_subscribe_resumes_exactly_across_a_restart_of_the_stream_service(
    start: Callable[..., Service], publisher: Service, channel: str
) -> None:
    sse = start("stream", RETRY_MS="100")
    port = sse.port
    with Publisher(publisher.url) as pub:
        events = subscribe(sse.url, [channel], last_event_id=pub.publish(channel, "before"), max_delay=0.5)
        ids = [pub.publish(channel, n) for n in range(3)]
        first = take(events, 3)
        sse.stop()  # the stream ends; the client keeps trying to reconnect
        missed = [pub.publish(channel, n) for n in range(3, 6)]
        start("stream", RETRY_MS="100", port=port)  # back on the same address
        rest = take(events, 3, timeout=30)
    assert [e.id for e in first] == ids and [e.data for e in first] == [0, 1, 2]
    assert [e.id for e in rest] == missed and [e.data for e in rest] == [3, 4, 5]


@pytest.fixture
def own_redis() -> Iterator[Any]:
    """A Redis container of this test's own, to restart."""
    require_docker("the client's retry test")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE).with_command(
        "redis-server --appendonly yes --protected-mode no"
    ) as container:
        yield container


def test_a_publish_retried_across_a_redis_restart_lands_exactly_once(
    start: Callable[..., Service], own_redis: Any, channel: str
) -> None:
    wrapped = own_redis.get_wrapped_container()
    wrapped.reload()
    ip = wrapped.attrs["NetworkSettings"]["IPAddress"]  # stable across a restart, unlike a mapped port
    url = f"redis://{ip}:6379/0"
    pub = start("publisher", redis_url_override=url, REDIS_TIMEOUT_SECONDS="1", RETRY_AFTER_SECONDS="1")
    db = redis.Redis.from_url(url)
    assert db.ping()
    wrapped.stop(timeout=1)
    result: dict[str, Any] = {}

    def publish() -> None:
        with Publisher(pub.url, attempts=30, max_delay=1) as client:
            result["id"] = client.publish(channel, {"once": True})

    worker = threading.Thread(target=publish)
    worker.start()
    time.sleep(2.5)  # several tries answered 503 meanwhile
    wrapped.start()
    worker.join(60)
    assert "id" in result
    stored: Any = db.xrange(keys.stream_key(channel))
    assert len(stored) == 1  # once, whatever the retries
    assert result["id"].endswith("-" + stored[0][0].decode().split("-")[0])


def test_a_publish_whose_answer_timed_out_is_retried_and_stored_once(
    start: Callable[..., Service], own_redis: Any, channel: str
) -> None:
    # A frozen Redis: the publisher's script is sent, the publisher gives up
    # (503 redis_timeout: outcome unknown), the client retries with the same
    # Idempotency-Key; once Redis resumes, the first try's script runs, and the
    # retries replay its answer.
    url = f"redis://{own_redis.get_container_host_ip()}:{own_redis.get_exposed_port(6379)}/0"
    pub = start("publisher", redis_url_override=url, REDIS_TIMEOUT_SECONDS="0.5")
    db = redis.Redis.from_url(url)
    wrapped = own_redis.get_wrapped_container()
    wrapped.pause()
    result: dict[str, Any] = {}

    def publish() -> None:
        with Publisher(pub.url, attempts=30, max_delay=0.5) as client:
            result["id"] = client.publish(channel, {"frozen": True})

    worker = threading.Thread(target=publish)
    try:
        worker.start()
        time.sleep(2)
    finally:
        wrapped.unpause()
    worker.join(60)
    assert "id" in result
    assert db.xlen(keys.stream_key(channel)) == 1


def test_the_async_publisher_retries_the_same_way(publisher: Service, stream: Service, channel: str) -> None:
    async def run() -> list[str]:
        async with AsyncPublisher(publisher.url) as pub:
            one = await pub.publish(channel, {"async": 1})
            many = await pub.publish_many([(channel, 2, None), (channel, 3, "e")])
            return [one, *many]

    ids = asyncio.run(run())
    assert len(set(ids)) == 3
    events = subscribe(stream.url, [channel], last_event_id=ids[0])
    got = take(events, 2)
    assert [e.id for e in got] == ids[1:] and [e.data for e in got] == [2, 3]
