"""Capacity through the Compose nginx: thousands of streams, and clean refusals when full.

The 5,000 streams are opened from inside nginx's network namespace (nsenter), as
clients on other hosts reach it: on loopback, Docker's userland proxy for the
published port (docker-proxy) holds six files per connection and, on a daemon
limited to 20,000 open files as on this project's CI host, stops accepting at
about 3,300 connections (docs/capacity.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.e2e.conftest import running_stack
from tests.e2e.support import ROOT, Stack, wait_until
from tests.support import keys
from tests.support.docker import in_ci

STREAMS = 5000
OPEN_TIMEOUT = 180


def _require_nsenter() -> None:
    problem = None
    if os.geteuid() != 0:
        problem = "entering nginx's network namespace needs root"
    elif shutil.which("nsenter") is None:
        problem = "nsenter (util-linux) is missing"
    if problem is None:
        return
    if in_ci():
        pytest.fail(problem + " (CI must provide it)", pytrace=False)
    pytest.skip(problem)


def stream_stats(stack: Stack) -> list[dict[str, Any]]:
    """/stats of every running stream-service replica."""
    return [json.loads(stack.internal_get(c, "/stats")) for c in stack.containers("stream-service")]


def clients(stack: Stack) -> int:
    return sum(int(s["clients"]) for s in stream_stats(stack))


def assert_nothing_left_behind(stack: Stack, channel: str) -> None:
    """Every replica lets go of every client, and of the channel's Redis subscription."""
    wait_until(lambda: clients(stack) == 0, 30, "every stream-service client to be gone")
    wait_until(
        lambda: stack.redis_cli("PUBSUB", "SHARDNUMSUB", keys.live_key(channel)).split()[-1] == "0",
        30,
        "the channel's Redis subscription to end",
    )


class NamespaceClient:
    """tests/e2e/capacity_client.py, run inside the nginx container's network namespace."""

    def __init__(self, stack: Stack, streams: int, channel: str, marker: str) -> None:
        nginx_pid = stack.docker("inspect", "-f", "{{.State.Pid}}", stack.containers("nginx")[0]).strip()
        command = [
            "nsenter", "-t", nginx_pid, "-n", "--",
            sys.executable, "-m", "tests.e2e.capacity_client",
            "--port", "80", "--streams", str(streams), "--channel", channel, "--marker", marker,
            "--timeout", str(OPEN_TIMEOUT),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the capacity client ended early (exit {self.process.wait(10)})"
        return dict(json.loads(line))

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.mark.timeout(OPEN_TIMEOUT * 2 + 120)
def test_thousands_of_streams_through_nginx_each_get_the_next_event(
    stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    _require_nsenter()
    marker = f"capacity-{secrets.token_hex(4)}"
    started = time.monotonic()
    client = NamespaceClient(stack, STREAMS, channel, marker)
    try:
        opened = client.read()
        assert opened == {"opened": STREAMS, "failed": {}}, opened
        measurements[f"{STREAMS} streams through nginx: open, s"] = round(time.monotonic() - started, 1)
        assert clients(stack) >= STREAMS
        stack.publish(channel, {"marker": marker})
        sent = time.monotonic()
        client.go()
        result = client.read()
        measurements[f"{STREAMS} streams: one event reached all, s"] = round(time.monotonic() - sent, 2)
        assert result == {"received": STREAMS, "missing": 0}, result
    finally:
        client.close()
    assert_nothing_left_behind(stack, channel)


# --- refusals when full: a stack with deliberately small limits -------------------

MAX_CONNECTIONS = 10  # per stream-service replica
NGINX_MAX_STREAMS = 15  # over all replicas


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("herald-e2e-small")
    limits = {"MAX_CONNECTIONS": str(MAX_CONNECTIONS), "NGINX_MAX_STREAMS": str(NGINX_MAX_STREAMS)}
    with running_stack(workdir, limits) as the_stack:
        yield the_stack


def assert_json_503(answer: requests.Response, *codes: str) -> None:
    assert answer.status_code == 503, (answer.status_code, dict(answer.headers))
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] in codes
    assert answer.json()["message"]
    assert int(answer.headers["Retry-After"]) >= 1


def accepted(stack: Stack, channel: str) -> requests.Response | None:
    """A new stream if it was accepted (200); a refused one is closed at once."""
    answer = stack.open_stream([channel])
    if answer.status_code == 200:
        return answer
    answer.close()
    return None


def test_streams_beyond_the_limits_get_json_503_and_nothing_is_left_behind(
    small: Stack, channel: str
) -> None:
    held: list[requests.Response] = []
    try:
        # One replica holds MAX_CONNECTIONS streams; the next is refused by the service.
        held += [small.open_stream([channel]) for _ in range(MAX_CONNECTIONS)]
        assert [r.status_code for r in held] == [200] * MAX_CONNECTIONS
        # The full replica's own answer, or, when nginx tried the empty stream
        # slots after it (nginx/entrypoint.sh), nginx's: a 503 either way.
        assert_json_503(small.open_stream([channel]), "too_many_connections", "service_unavailable")
        # Two replicas hold twice as many (nginx skips the full one), up to nginx's own limit.
        small.scale_streams(2)
        for _ in range(NGINX_MAX_STREAMS - MAX_CONNECTIONS):
            # nginx tries every slot for each new stream: the new replica's at once.
            held.append(wait_until(lambda: accepted(small, channel), 30, "a stream on the second replica"))
        assert clients(small) == NGINX_MAX_STREAMS
        # Beyond NGINX_MAX_STREAMS nginx refuses by itself: JSON 503, never a 500.
        assert_json_503(small.open_stream([channel]), "service_unavailable")
    finally:
        for response in held:
            response.close()
    assert_nothing_left_behind(small, channel)
    # nginx's count went back down too: a new stream is welcome again.
    again = small.open_stream([channel])
    try:
        assert again.status_code == 200
    finally:
        again.close()


def test_only_get_opens_a_stream_through_nginx(small: Stack, channel: str) -> None:
    url = small.url(f"/stream?channel={channel}")
    head = requests.head(url, timeout=10)
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("text/event-stream")
    for method in ("POST", "PUT", "PATCH", "DELETE"):  # OPTIONS: CORS preflights (test_cross_origin.py)
        answer = requests.request(method, url, timeout=10)
        assert answer.status_code == 405, method
        assert answer.headers["content-type"] == "application/json", method
        assert answer.json()["error"] == "method_not_allowed", method
        assert "GET" in answer.headers["Allow"], method
    assert clients(small) == 0, "a method other than GET left a subscriber attached"
