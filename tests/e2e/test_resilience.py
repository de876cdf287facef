"""Scaled stream replicas behind nginx, replicas and Redis going away."""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.e2e.support import ResumingClient, Stack, iter_frames, sse_events, until_live, wait_until

pytestmark = pytest.mark.e2e

REPLICAS = 3
LOG_LINE = re.compile(
    r'"GET /stream\?channel=(?P<channel>[^ &"]+)[^"]* HTTP/1\.1" (?P<status>\d{3}) .*'
    r'ua="(?P<ua>[^"]*)" us="(?P<us>[^"]*)"'
)


@pytest.fixture(scope="module")
def replicas(stack: Stack) -> list[str]:
    """Three stream-service replicas (`up --scale stream-service=3`)."""
    return stack.scale_streams(REPLICAS)


def short_stream(stack: Stack, channel: str) -> int:
    """Open a stream, read its first frame, close it; return the status."""
    with stack.open_stream([channel], read_timeout=10) as response:
        if response.status_code == 200:
            next(iter_frames(response))
        return response.status_code


def log_entries(stack: Stack, prefix: str) -> list[dict[str, str]]:
    entries = []
    for line in stack.nginx_log():
        match = LOG_LINE.search(line)
        if match and match["channel"].startswith(prefix):
            entries.append(match.groupdict())
    return entries


def test_streams_are_spread_over_all_replicas(
    stack: Stack, replicas: list[str], channel: str, measurements: dict[str, Any]
) -> None:
    # nginx's log names the upstream: the replica's Unix socket (stream/slots.py).
    slots = {c: json.loads(stack.internal_get(c, "/stats"))["slot"] for c in replicas}
    sockets = {f"unix:/run/herald/stream-{slot}.sock": c for c, slot in slots.items()}
    total = 60
    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda n: short_stream(stack, f"{channel}.{n}"), range(total)))
    assert statuses == [200] * total
    entries = wait_until(
        lambda: (e := log_entries(stack, channel + ".")) and len(e) >= total and e, 10, "nginx log lines"
    )
    # The last address is the one that answered (empty slots tried before it are listed first).
    per_replica = Counter(e["ua"].split(", ")[-1] for e in entries)
    measurements[f"streams per replica ({total} streams, {REPLICAS} replicas)"] = dict(per_replica)
    assert set(per_replica) == set(sockets), (per_replica, sockets)
    assert min(per_replica.values()) >= 5, per_replica


def test_stopping_a_replica_loses_no_event(
    stack: Stack, replicas: list[str], channel: str, measurements: dict[str, Any]
) -> None:
    """Clients on a stopped replica resume elsewhere: every client gets every
    event exactly once, in order; new streams opened meanwhile never fail."""
    clients_count, per_phase = 9, 15
    expected = 4 * per_phase
    start_id = stack.publish(channel, "start", event="start")
    deadline = time.monotonic() + 90
    clients = [
        ResumingClient(stack, [channel], start_id, expected, deadline, name=f"client-{n}")
        for n in range(clients_count)
    ]
    for client in clients:
        client.start()
    for client in clients:
        assert client.connected.wait(15), f"{client.name} never connected: {client.refused} {client.errors}"

    published = [stack.publish(channel, {"n": n}, event="tick") for n in range(per_phase)]
    wait_until(lambda: all(len(c.events) >= per_phase for c in clients), 15, "the first events everywhere")
    on_replica = {c: stack.established_streams(c) for c in replicas}
    victim = max(on_replica, key=lambda c: on_replica[c])
    assert on_replica[victim] > 0, on_replica

    # New streams keep being opened while the replica goes away (nginx must
    # skip it: proxy_next_upstream and DNS re-resolution).
    probe_statuses: list[int] = []
    probing = threading.Event()
    probing.set()
    probe_prefix = channel + ".probe"

    def probe() -> None:
        n = 0
        while probing.is_set() and n < 400:
            probe_statuses.append(short_stream(stack, f"{probe_prefix}.{n}"))
            n += 1
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.3)
    stopped_in: list[float] = []

    def stop_victim() -> None:
        began = time.monotonic()
        stack.docker("stop", victim, timeout=60)
        stopped_in.append(time.monotonic() - began)

    stopper = threading.Thread(target=stop_victim, daemon=True)
    stopper.start()
    for n in range(per_phase, 2 * per_phase):
        published.append(stack.publish(channel, {"n": n}, event="tick"))
        time.sleep(0.03)
    stopper.join(60)
    assert stopped_in, "docker stop did not finish"
    for n in range(2 * per_phase, 3 * per_phase):
        published.append(stack.publish(channel, {"n": n}, event="tick"))
    time.sleep(2.5)  # DNS_VALID: let nginx's cached answer (with the stopped IP) expire while probing
    stack.docker("start", victim)
    stack.wait_healthy("stream-service", REPLICAS, timeout=60)
    for n in range(3 * per_phase, 4 * per_phase):
        published.append(stack.publish(channel, {"n": n}, event="tick"))
    probing.clear()
    prober.join(30)

    wait_until(lambda: all(c.done() for c in clients), 30, "every client to get every event")
    for client in clients:
        client.stop()
    for client in clients:
        client.join(10)
        got = [e.id for e in client.events]
        assert got == published, f"{client.name}: {len(got)} events, first difference at " + str(
            next((i for i, (a, b) in enumerate(zip(got, published, strict=False)) if a != b), len(got))
        )
        assert all(e.event == "tick" for e in client.events)
        assert [json.loads(e.data)["n"] for e in client.events] == list(range(expected))

    moved = [c for c in clients if c.connections > 1]
    gaps = [opened - ended for c in moved for ended, opened in zip(c.ended_at, c.reopened_at, strict=False)]
    probes = log_entries(stack, probe_prefix + ".")
    retried = [e for e in probes if "," in e["us"]]
    measurements["replica stop: clients moved / on victim / total"] = (
        f"{len(moved)} / {on_replica[victim]} / {clients_count}"
    )
    if gaps:
        measurements["replica stop: client reconnect time, s (median/max)"] = (
            f"{statistics.median(gaps):.2f} / {max(gaps):.2f}"
        )
    measurements["replica stop: docker stop took, s"] = round(stopped_in[0], 2)
    measurements["replica stop: probe streams ok / total / retried by nginx on another replica"] = (
        f"{probe_statuses.count(200)} / {len(probe_statuses)} / {len(retried)} "
        f"{dict(Counter(e['us'] for e in retried))}"
    )
    assert len(moved) >= 1
    assert probe_statuses and all(s == 200 for s in probe_statuses), Counter(probe_statuses)


def test_acknowledged_events_survive_a_redis_crash(
    stack: Stack, replicas: list[str], channel: str, measurements: dict[str, Any]
) -> None:
    """AOF with appendfsync always: after SIGKILL and restart, history is intact."""
    ids = [stack.publish(channel, {"n": n}) for n in range(5)]
    redis_container = stack.containers("redis")[0]
    began = time.monotonic()
    stack.docker("kill", "--signal", "KILL", redis_container)
    stack.docker("start", redis_container)
    stack.wait_healthy("redis", 1, timeout=60)

    # The publisher reconnects by itself.
    ids.append(wait_until(lambda: stack.publish(channel, {"n": 5}), 30, "publishing after the restart", 0.5))
    measurements["redis SIGKILL -> publishing again, s"] = round(time.monotonic() - began, 2)

    # Resume from the first id: everything after it, no reset (same epoch).
    def resumed() -> list[Any] | None:
        with stack.open_stream([channel], query_id=ids[0], read_timeout=10) as response:
            if response.status_code != 200:
                return None
            events = sse_events(response)
            return [next(events) for _ in range(5)]

    got = wait_until(resumed, 30, "a stream after the Redis restart", 0.5)
    assert [e.event for e in got] == ["message"] * 5, [(e.event, e.data) for e in got]
    assert [e.id for e in got] == ids[1:]
    assert [json.loads(e.data)["n"] for e in got] == [1, 2, 3, 4, 5]

    # Live delivery works again too (the replicas' Pub/Sub resubscribed).
    with stack.open_stream([channel], query_id=ids[-1], read_timeout=10) as response:
        assert response.status_code == 200
        frames = iter_frames(response)
        until_live(frames)  # resumed: no position frame, events next
        sent = time.monotonic()
        live_id = stack.publish(channel, {"n": 6})
        frame = next(f for f in frames if f.data)
        assert frame.fields["id"] == live_id
        assert frame.at - sent < 2.0


def test_nginx_answers_json_502_when_services_are_down(stack: Stack, replicas: list[str]) -> None:
    stack.compose("stop", "publisher-service", "stream-service", timeout=120)
    try:
        seen: list[int] = []

        def gateway_error(send: Callable[[], requests.Response], wanted: set[int]) -> list[requests.Response]:
            # A list: a Response with an error status is falsy.
            response = send()
            seen.append(response.status_code)
            return [response] if response.status_code in wanted else []

        # The publisher sits in an upstream block. nginx >= 1.27.3 re-resolves
        # its name (`resolve`): gone from DNS, 502. The local stand-in (1.22)
        # keeps the last address and times out connecting to it: 504.
        nginx_env = stack.docker(
            "inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", stack.containers("nginx")[0]
        )
        publish_codes = {502} if "NGINX_UPSTREAM_RESOLVE=resolve" in nginx_env.split() else {502, 504}
        [publish] = wait_until(
            lambda: gateway_error(
                lambda: stack.publish_raw({"channel": "e2e.down", "data": 1}), publish_codes
            ),
            15,
            "/publish to answer " + "/".join(map(str, sorted(publish_codes))),
        )
        # Streams: a variable proxy_pass, resolved per request. During DNS_VALID
        # nginx may still try the old address (504 after the connect timeout);
        # once the name is gone it is 502.
        [stream] = wait_until(
            lambda: gateway_error(
                lambda: requests.get(stack.url("/stream?channel=e2e.down"), timeout=10), {502}
            ),
            15,
            "/stream to answer 502",
        )
        assert publish.json()["error"] in {"bad_gateway", "gateway_timeout"}, seen
        assert stream.json()["error"] == "bad_gateway", seen
        for response in (publish, stream):
            assert response.headers["Content-Type"] == "application/json"
            assert response.headers["Retry-After"] == stack.settings.get("RETRY_AFTER_SECONDS", "2")
    finally:
        stack.scale_streams(REPLICAS)
    assert stack.publish("e2e.up-again", 1)
