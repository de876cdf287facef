"""Exactly-once, in-order delivery under load, slow clients, cleanup and Redis faults."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import redis
import requests

from tests.conftest import post_events, stats
from tests.integration.conftest import Deployment
from tests.support import keys
from tests.support.services import Service, eventually
from tests.support.sse_client import SSEClient, open_stream


def numsub(client: redis.Redis, channel: str) -> int:
    """Subscribers of the channel's sharded Pub/Sub channel."""
    key = keys.live_key(channel)
    return int(dict(client.pubsub_shardnumsub(key))[key.encode()])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def assert_exactly_once_in_order(client: SSEClient, expected: list[str]) -> None:
    got = [e.id for e in client.events]
    assert len(got) == len(set(got)), f"duplicates: {len(got) - len(set(got))}"
    assert got == expected, f"{len(set(expected) - set(got))} missing of {len(expected)}"


def test_200_subscribers_each_get_all_100_events_in_order(
    start: Callable[..., Service], publish: Callable[..., str], redis_client: redis.Redis, channel: str
) -> None:
    service = start("stream", HEARTBEAT_SECONDS="1")
    clients = [open_stream(service.url, [channel]) for _ in range(200)]
    try:
        assert all(c.status == 200 for c in clients)
        # One Redis subscription for all 200 clients of this worker.
        assert numsub(redis_client, channel) == 1
        assert stats(service)["clients"] == 200
        sent = [publish(channel, {"n": i}) for i in range(100)]
        for client in clients:
            client.wait_events(100, timeout=30)
            assert_exactly_once_in_order(client, sent)
    finally:
        for client in clients:
            client.close()
    # Everything is released once the clients are gone: Redis and the worker agree.
    assert eventually(lambda: stats(service)["clients"] == 0 and numsub(redis_client, channel) == 0, 5)
    assert stats(service)["channels"] == 0 and stats(service)["subscribed"] == 0


def test_a_closed_client_is_cleaned_up_within_one_heartbeat(
    start: Callable[..., Service], redis_client: redis.Redis, channel: str
) -> None:
    service = start("stream", HEARTBEAT_SECONDS="2")
    client = open_stream(service.url, [channel])
    assert numsub(redis_client, channel) == 1
    closed_at = time.monotonic()
    client.close()
    assert eventually(lambda: numsub(redis_client, channel) == 0 and stats(service)["clients"] == 0, 2)
    assert time.monotonic() - closed_at < 2


def test_one_pubsub_connection_per_worker(
    start: Callable[..., Service], redis_client: redis.Redis, channel: str
) -> None:
    service = start("stream", HEARTBEAT_SECONDS="1")
    name_before = {c["id"] for c in redis_client.client_list(_type="pubsub")}
    clients = [open_stream(service.url, [f"{channel}.{i}"]) for i in range(50)]
    try:
        new = [c for c in redis_client.client_list(_type="pubsub") if c["id"] not in name_before]
        assert len(new) == 1, new
        assert int(new[0]["ssub"]) == 50  # sharded Pub/Sub: SSUBSCRIBE
    finally:
        for client in clients:
            client.close()


def test_slow_client_is_dropped_and_memory_stays_bounded(start: Callable[..., Service], channel: str) -> None:
    service = start("stream", HEARTBEAT_SECONDS="1", CLIENT_BUFFER_BYTES="262144")
    pub = start("publisher", MAX_BODY_BYTES=str(8 * 1024 * 1024))
    (worker,) = service.worker_pids()
    healthy = open_stream(service.url, [channel])
    # A client that sends its request and then never reads a byte.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", service.port))
    slow.sendall(f"GET /stream?channel={channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        assert eventually(lambda: stats(service)["clients"] == 2, 5)
        before = rss_kib(worker)
        blob = "x" * 60000
        sent: list[str] = []
        for _ in range(20):  # 20 batches x 20 events x 60 KB = 24 MB through the worker
            answer = post_events(pub.url, [{"channel": channel, "data": blob}] * 20)
            assert answer.status_code == 202, answer.text
            sent += [e["id"] for e in answer.json()["events"]]
        healthy.wait_events(len(sent), timeout=60)
        assert_exactly_once_in_order(healthy, sent)
        after = rss_kib(worker)
        snapshot = stats(service)
        assert snapshot["dropped_slow"] == 1
        assert snapshot["clients"] == 1
        # 24 MB went out; the worker grew by far less than that.
        assert after - before < 16 * 1024, (before, after)
    finally:
        slow.close()
        healthy.close()


def test_killed_pubsub_connection_loses_nothing(
    start: Callable[..., Service], publish: Callable[..., str], redis_client: redis.Redis, channel: str
) -> None:
    service = start("stream", HEARTBEAT_SECONDS="1")
    clients = [open_stream(service.url, [channel]) for _ in range(20)]
    sent: list[str] = []
    done = threading.Event()

    def publish_steadily() -> None:
        for i in range(300):
            sent.append(publish(channel, i))
            time.sleep(0.003)
        done.set()

    publisher_thread = threading.Thread(target=publish_steadily)
    publisher_thread.start()
    kills = 0
    try:
        while not done.is_set() and kills < 5:
            time.sleep(0.1)
            mine = [c for c in redis_client.client_list(_type="pubsub") if int(c.get("ssub", 0)) >= 1]
            for conn in mine:
                redis_client.client_kill_filter(_id=conn["id"])
            kills += 1
        publisher_thread.join(60)
        for client in clients:
            client.wait_events(300, timeout=30)
            assert_exactly_once_in_order(client, sent)
        assert stats(service)["reconnects"] >= 3
    finally:
        for client in clients:
            client.close()


def test_hung_redis_is_noticed_by_the_watchdog_and_nothing_is_lost(
    start: Callable[..., Service],
    publisher: Service,
    publish: Callable[..., str],
    redis_client: redis.Redis,
    channel: str,
) -> None:
    service = start("stream", HEARTBEAT_SECONDS="1", WATCHDOG_SECONDS="1")
    client = open_stream(service.url, [channel])
    try:
        before = [publish(channel, i) for i in range(5)]
        client.wait_events(5)
        # Redis stops answering everyone for 3 s, without closing any connection.
        redis_client.execute_command("CLIENT", "PAUSE", "3000", "ALL")
        assert eventually(lambda: stats(service)["reconnects"] >= 1, 10)
        # Publishers get 503 + Retry-After while Redis hangs; they retry.
        assert eventually(lambda: requests.get(f"{publisher.url}/readyz", timeout=5).ok, 10)
        after = [publish(channel, i) for i in range(5, 10)]
        client.wait_events(10, timeout=15)
        assert_exactly_once_in_order(client, before + after)
    finally:
        client.close()


def test_stop_ends_streams_cleanly_and_quickly(start: Callable[..., Service], channel: str) -> None:
    service = start("stream", HEARTBEAT_SECONDS="5", GRACEFUL_TIMEOUT="20")
    client = open_stream(service.url, [channel])
    began = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    # The stream ends with a proper end of body (the browser then reconnects)...
    assert client.wait_for(lambda: client.ended is not None, timeout=10)
    assert client.ended == "eof"
    # ...and the worker does not sit out its graceful timeout.
    service.process.wait(15)
    assert time.monotonic() - began < 10


def test_streams_opened_while_publishing_get_everything_after_their_position(
    deployment: Deployment, start_on: Callable[..., Service], channel: str
) -> None:
    # Many clients open the same new channel at once while events flow: each
    # must get exactly the events after the position its stream started at,
    # also those published before Redis confirmed the channel's subscription.
    service = start_on("stream", HEARTBEAT_SECONDS="1")
    sent: list[str] = []
    done = threading.Event()

    def publish_steadily() -> None:
        for i in range(150):
            sent.append(deployment.publish(channel, i))
        done.set()

    publisher_thread = threading.Thread(target=publish_steadily)
    publisher_thread.start()
    clients: list[SSEClient] = []
    openers = [
        threading.Thread(target=lambda: clients.append(open_stream(service.url, [channel])))
        for _ in range(30)
    ]
    try:
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(30)
        publisher_thread.join(60)
        assert done.is_set() and len(clients) == 30
        for client in clients:
            assert client.status == 200, (client.status, client.body)
            position = int(client.raw.split(b"\nid: ", 1)[1].split(b"\n", 1)[0].rsplit(b"-", 1)[1])
            expected = [i for i in sent if int(i.rsplit("-", 1)[1]) > position]
            client.wait_events(len(expected), timeout=30)
            assert_exactly_once_in_order(client, expected)
    finally:
        for client in clients:
            client.close()
