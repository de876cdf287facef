"""The webhook dispatcher (`python -m dispatcher`, real processes) on a real
Redis, sending to a real HTTP receiver: signed events in order per channel,
retries with backoff and Retry-After, timeouts, dead letters and their replay,
a dispatcher killed between a POST and its acknowledgement, lanes shared by
several dispatchers and taken over from a dead one, and batches.

Events come from the stream service's own presence code (stream/presence.py
with webhooks on), driven by hand as in test_occupancy.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from herald_client import verify_webhook
from stream import occupancy
from stream.contract import partition_of
from stream.presence import Presence

from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.receiver import Answer, Receiver, running_receiver
from tests.support.services import ROOT, eventually, free_port, wait_ready

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
DELAY = 0.3
TTL = 60  # no worker here lapses: each test says when streams leave


@pytest.fixture(scope="module")
def hooks_redis() -> Iterator[str]:
    """A Redis of this module's own: its lanes hold only this module's events."""
    require_docker("the dispatcher tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


@pytest.fixture
def client(hooks_redis: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(hooks_redis)
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as r:
        yield r


class Dispatcher:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log_path = process, port, log

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        values = [float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        return sum(values)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)


@pytest.fixture
def start(hooks_redis: str, receiver: Receiver, tmp_path: Path) -> Iterator[Callable[..., Dispatcher]]:
    started: list[Dispatcher] = []

    def run(**env: str) -> Dispatcher:
        port = free_port()
        log = tmp_path / f"dispatcher-{port}.log"
        full_env = {
            **os.environ,
            "REDIS_URL": hooks_redis,
            "WEBHOOK_URL": receiver.url,
            "WEBHOOK_SECRET": SECRET,
            "WEBHOOK_TIMEOUT_SECONDS": "1",
            "WEBHOOK_LEASE_SECONDS": "3",
            "WEBHOOK_BACKOFF_MAX_SECONDS": "0.5",
            "WEBHOOK_VACATED_DELAY_SECONDS": str(DELAY),
            "DISPATCHER_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "dispatcher"],
                cwd=ROOT / "publisher-service",
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        d = Dispatcher(process, port, log)
        started.append(d)
        wait_ready(f"http://127.0.0.1:{port}/readyz", process=process)
        return d

    yield run
    for d in started:
        d.stop(signal.SIGKILL)


def worker(client: redis.Redis) -> Presence:
    return Presence(lambda: client, TTL, DELAY)


def channel(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


def occupy_and_vacate(client: redis.Redis, name: str) -> None:
    """One occupied/vacated pair on `name` (the dispatcher's sweep sends the vacated)."""
    w = worker(client)
    w.sync({(partition_of(name, 1), name): 1})
    w.sync({})


def kinds(receiver: Receiver, name: str) -> list[str]:
    return [e["type"].removeprefix("channel.") for _, e in receiver.events(name)]


def test_signed_events_arrive_in_order_per_channel(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    start()
    names = [channel(f"order{i}") for i in range(6)]
    for _ in range(2):
        for name in names:
            occupy_and_vacate(client, name)
        time.sleep(DELAY + 0.3)  # each pair sent before the next occupied

    def two_pairs(name: str) -> bool:
        return kinds(receiver, name) == ["occupied", "vacated"] * 2

    for name in names:
        assert eventually(lambda: two_pairs(name), 15), kinds(receiver, name)  # noqa: B023
    for r in receiver.taken("order"):
        event = verify_webhook(r.body, r.headers, SECRET)
        assert event["id"] == r.id
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
        assert r.headers["content-type"] == "application/json"
    ids = [i for i, _ in receiver.events("order")]
    assert len(set(ids)) == len(ids) == 24, "each event once, each with its own id"


def test_a_rotated_secret_signs_with_both(client: redis.Redis, receiver: Receiver, start: Any) -> None:
    start(WEBHOOK_SECRET=f"{OTHER_SECRET} {SECRET}")
    name = channel("rotate")
    occupy_and_vacate(client, name)
    assert eventually(lambda: len(receiver.taken(name)) == 2, 10)
    for r in receiver.taken(name):
        assert len(r.headers["webhook-signature"].split(" ")) == 2
        verify_webhook(r.body, r.headers, SECRET)
        verify_webhook(r.body, r.headers, OTHER_SECRET)


def test_failures_are_retried_with_the_same_id_honouring_retry_after(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    failures: Iterator[Answer] = iter([(503, {"retry-after": "2"}, 0.0), (500, {}, 0.0)])
    receiver.answer = lambda r: next(failures, (204, {}, 0.0))
    d = start()
    name = channel("retry")
    w = worker(client)
    w.sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.taken(name)) == 3, 15), (receiver.requests, d.log())
    tries = receiver.taken(name)
    assert len({r.id for r in tries}) == 1, "a retry keeps the webhook-id"
    assert tries[1].at - tries[0].at >= 1.9, "Retry-After: 2 was not honoured"
    assert int(tries[2].headers["webhook-timestamp"]) >= int(tries[0].headers["webhook-timestamp"])
    assert d.metric("herald_webhook_attempts_failed_total") == 2
    assert d.metric("herald_webhook_retries_total") == 2
    assert d.metric("herald_webhook_events_sent_total") == 1


def test_a_receiver_that_times_out_gets_the_event_again(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    slow: Iterator[Answer] = iter([(204, {}, 3.0)])
    receiver.answer = lambda r: next(slow, (204, {}, 0.0))
    start()
    name = channel("slow")
    worker(client).sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.taken(name)) == 2, 15)
    first, second = receiver.taken(name)
    assert first.id == second.id


def test_after_the_retry_window_events_go_to_the_dead_letters_and_replay(
    client: redis.Redis, receiver: Receiver, start: Any, hooks_redis: str
) -> None:
    down = True
    receiver.answer = lambda r: (500, {}, 0.0) if down else (204, {}, 0.0)
    d = start(WEBHOOK_RETRY_SECONDS="1")
    name = channel("dead")
    occupy_and_vacate(client, name)
    assert eventually(lambda: d.metric("herald_webhook_events_dead_lettered_total") == 2, 15), d.log()
    letters = cli(hooks_redis, receiver, "dead-letters")
    assert [json.loads(line)["channel"] for line in letters.splitlines()] == [name, name]
    assert "channel.occupied" in letters and "500" in letters
    failed_ids = {r.id for r in receiver.taken(name)}
    down = False
    assert json.loads(cli(hooks_redis, receiver, "replay", "--all")) == {"replayed": 2}
    assert eventually(lambda: any(r.id in failed_ids for r in receiver.taken(name)[-2:]), 10)
    assert cli(hooks_redis, receiver, "dead-letters") == ""
    replayed = receiver.taken(name)[-2:]
    assert [r.json()["type"] for r in replayed] == ["channel.occupied", "channel.vacated"]
    assert {r.id for r in replayed} == failed_ids, "a replay keeps the event's id"


def test_killed_between_the_post_and_its_acknowledgement(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    hold: Iterator[Answer] = iter([(204, {}, 30.0)])  # the first answer never comes in time
    receiver.answer = lambda r: next(hold, (204, {}, 0.0))
    doomed = start(WEBHOOK_TIMEOUT_SECONDS="10", WEBHOOK_LEASE_SECONDS="21")
    name = channel("kill")
    worker(client).sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.taken(name)) == 1, 10)
    doomed.stop(signal.SIGKILL)
    start(WEBHOOK_LEASE_SECONDS="3")  # takes the lane once the dead one's lease lapses
    assert eventually(lambda: len(receiver.taken(name)) == 2, 40)
    first, again = receiver.taken(name)
    assert first.id == again.id
    assert again.at - first.at >= 15, "sent again before the dead holder's lease lapsed"


def test_dispatchers_share_the_lanes_and_take_over_a_dead_ones(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    a, b = start(), start()
    assert eventually(
        lambda: a.metric("herald_webhook_lanes_held") + b.metric("herald_webhook_lanes_held") == 8, 10
    )
    assert eventually(lambda: a.metric("herald_webhook_lanes_held") == 4, 10)
    names = [channel(f"share{i}") for i in range(12)]
    for name in names:
        worker(client).sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.events("share")) == 12, 10)
    assert (
        a.metric("herald_webhook_events_sent_total") > 0 and b.metric("herald_webhook_events_sent_total") > 0
    )
    b.stop(signal.SIGKILL)
    assert eventually(lambda: a.metric("herald_webhook_lanes_held") == 8, 15)
    more = [channel(f"after{i}") for i in range(12)]
    for name in more:
        worker(client).sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.events("after")) == 12, 10)


def test_a_clean_stop_hands_the_lanes_over_at_once(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    a, b = start(WEBHOOK_LEASE_SECONDS="30", WEBHOOK_TIMEOUT_SECONDS="1"), start(WEBHOOK_LEASE_SECONDS="30")
    assert eventually(lambda: a.metric("herald_webhook_lanes_held") == 4, 20)
    a.stop()
    assert a.process.returncode == 0
    assert eventually(lambda: b.metric("herald_webhook_lanes_held") == 8, 12), (
        "waited for the leases to lapse"
    )


def test_batches_carry_several_events(client: redis.Redis, receiver: Receiver, start: Any) -> None:
    gate = True
    receiver.answer = lambda r: (503, {"retry-after": "1"}, 0.0) if gate else (204, {}, 0.0)
    start(WEBHOOK_BATCH_MAX="50")
    names = [channel("batch") for _ in range(40)]
    w = worker(client)
    w.sync({(partition_of(n, 1), n): 1 for n in names})
    time.sleep(1.5)  # the lanes fill while the receiver refuses
    gate = False
    assert eventually(lambda: len({e["id"] for _, e in receiver.events("batch")}) == 40, 15)
    taken = [r for r in receiver.taken("batch") if r.json()["type"] == "batch"]
    assert taken and max(len(r.events()) for r in taken) > 1
    for r in taken:
        verify_webhook(r.body, r.headers, SECRET)


def test_off_without_a_url(start: Any) -> None:
    d = start(WEBHOOK_URL="", REDIS_URL="redis://127.0.0.1:1/0")  # no Redis needed
    with urllib.request.urlopen(f"http://127.0.0.1:{d.port}/readyz", timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": "ok", "webhooks": "off"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WEBHOOK_SECRET": ""}, "WEBHOOK_SECRET is required"),
        ({"WEBHOOK_SECRET": "not-a-secret"}, "must be whsec_ followed by base64"),
        ({"WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"short").decode()}, "24 to 64 bytes"),
        ({"WEBHOOK_URL": "ftp://example/hook"}, "http:// or https://"),
        ({"WEBHOOK_LEASE_SECONDS": "5", "WEBHOOK_TIMEOUT_SECONDS": "10"}, "WEBHOOK_LEASE_SECONDS"),
        ({"WEBHOOK_BATCH_MAX": "0"}, "WEBHOOK_BATCH_MAX"),
    ],
)
def test_bad_settings_are_refused_with_a_message(
    env: dict[str, str], message: str, hooks_redis: str, receiver: Receiver
) -> None:
    full = {
        **os.environ,
        "REDIS_URL": hooks_redis,
        "WEBHOOK_URL": receiver.url,
        "WEBHOOK_SECRET": SECRET,
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher"],
        cwd=ROOT / "publisher-service",
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "k" * 8 not in done.stderr and SECRET not in done.stderr


def cli(hooks_redis: str, receiver: Receiver, *args: str) -> str:
    env = {**os.environ, "REDIS_URL": hooks_redis, "WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher", *args],
        cwd=ROOT / "publisher-service",
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_events_the_lane_cap_trimmed_unread_are_counted_as_dropped(
    client: redis.Redis, receiver: Receiver, start: Any
) -> None:
    first = start()
    name = channel("warm")
    worker(client).sync({(partition_of(name, 1), name): 1})
    assert eventually(lambda: len(receiver.taken(name)) == 1, 10)
    first.stop()  # no dispatcher drains the lanes now
    lane = int(hashlib.sha1(name.encode()).hexdigest()[:6], 16) % occupancy.LANES
    key = occupancy.lane_key(0, lane)
    now_ms = int(time.time() * 1000)
    for i in range(50):
        number = client.hincrby(occupancy.numbers_key(0), str(lane), 1)
        fields = {"type": "channel.occupied", "channel": f"trim-{i:02d}", "time": now_ms, "n": number}
        client.xadd(key, fields)  # type: ignore[arg-type]
    client.xtrim(key, maxlen=10, approximate=False)  # what the cap does to a lane nobody drains
    second = start()
    assert eventually(lambda: len(receiver.events("trim-")) == 10, 10)
    assert [e["data"]["channel"] for _, e in receiver.events("trim-")] == [f"trim-{i}" for i in range(40, 50)]
    assert eventually(lambda: second.metric("herald_webhook_events_dropped_total") == 40, 10), second.log()
    assert "40 event(s) for endpoint" in second.log()
