"""Fixtures shared by every layer: Redis, the two real services, helpers.

Redis comes from testcontainers (image pinned in tests/support/docker.py), or
from REDIS_URL when that is set. The services are real gunicorn processes with
gevent workers, started on free loopback ports.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from hypothesis import settings as hypothesis_settings

from tests.support.cluster import Cluster, running_cluster
from tests.support.docker import REDIS_IMAGE, in_ci, require_docker
from tests.support.services import Service, start_service

# Property-based tests explore new examples on every developer run; CI runs the
# same fixed set every time (same budget), so a red CI is never a dice roll.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if in_ci():
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis for the whole session."""
    existing = os.environ.get("REDIS_URL")
    if existing:
        yield existing
        return
    require_docker("the integration tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """A real Redis Cluster (3 masters, 3 replicas) for the whole session.
    A test that hurts it (kills a node) makes it whole again before it ends."""
    require_docker("the Redis Cluster tests")
    with running_cluster(REDIS_IMAGE) as cluster:
        yield cluster


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def publisher(redis_url: str, logs_dir: Path) -> Iterator[Service]:
    """The publisher with its default settings (open publishing)."""
    service = start_service("publisher", redis_url, logs_dir)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def stream(redis_url: str, logs_dir: Path) -> Iterator[Service]:
    """The stream service, one gevent worker, a short heartbeat."""
    service = start_service("stream", redis_url, logs_dir, HEARTBEAT_SECONDS="1")
    yield service
    service.stop()


@pytest.fixture
def start(redis_url: str, logs_dir: Path) -> Iterator[Callable[..., Service]]:
    """Start a service with custom settings for one test; stopped afterwards."""
    started: list[Service] = []

    def _start(
        kind: str,
        *,
        redis_url_override: str | None = None,
        ready: bool = True,
        port: int | None = None,
        **env: str,
    ) -> Service:
        url = redis_url_override or redis_url
        service = start_service(kind, url, logs_dir, ready=ready, port=port, **env)
        started.append(service)
        return service

    yield _start
    for service in started:
        service.stop()


@pytest.fixture
def channel() -> str:
    """A channel name no other test uses (Pub/Sub is shared by the whole Redis)."""
    return f"t.{uuid.uuid4().hex[:12]}"


def post_events(base: str, body: Any, token: str | None = None, **kwargs: Any) -> requests.Response:
    # Connection: close, so no idle keep-alive connection delays a service's stop.
    headers = {"Content-Type": "application/json", "Connection": "close", **kwargs.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return requests.post(f"{base}/publish", data=data, headers=headers, timeout=10, **kwargs)


@pytest.fixture
def publish(publisher: Service) -> Callable[..., str]:
    """Publish one event through the real publisher; return its id."""

    def _publish(channel: str, data: Any, event: str | None = None) -> str:
        body: dict[str, Any] = {"channel": channel, "data": data}
        if event:
            body["event"] = event
        answer = post_events(publisher.url, body)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    return _publish


def stats(service: Service) -> dict[str, Any]:
    """The stream service's own gauges and counters (one worker in the tests)."""
    return dict(requests.get(f"{service.url}/stats", timeout=5).json())
