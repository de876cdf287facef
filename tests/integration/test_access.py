"""Access control and operations: subscribe tokens, idempotency, CORS, metrics, logs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from functools import partial

import jwt
import redis
import requests

from tests.conftest import post_events
from tests.support import keys
from tests.support.services import Service
from tests.support.sse_client import SSEClient, open_stream, stream_url

SECRET = "test-subscribe-secret-" + uuid.uuid4().hex


def token(channels: list[str], ttl: float = 60, secret: str = SECRET) -> str:
    return jwt.encode({"channels": channels, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def test_private_channels_need_a_token_that_covers_them(
    start: Callable[..., Service], publish: Callable[..., str]
) -> None:
    service = start("stream", SUBSCRIBE_SECRET=SECRET, HEARTBEAT_SECONDS="1")
    mine, team, other = "private-user-1", "private-team-7", "private-user-2"
    base = f"{service.url}/stream"
    missing = requests.get(f"{base}?channel={mine}", timeout=5)
    assert missing.status_code == 401 and missing.json()["error"] == "token_required"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    forged = requests.get(f"{base}?channel={mine}&token={token([mine], secret='wrong-' + SECRET)}", timeout=5)
    assert forged.status_code == 401 and forged.json()["error"] == "invalid_token"
    expired = requests.get(f"{base}?channel={mine}&token={token([mine], ttl=-10)}", timeout=5)
    assert expired.status_code == 401 and expired.json()["error"] == "token_expired"
    good = token([mine, "private-team-*"])
    denied = requests.get(f"{base}?channel={mine}&channel={other}&token={good}", timeout=5)
    assert denied.status_code == 403 and denied.json()["error"] == "forbidden_channel"
    # The three ways to present a token: header, cookie, query parameter.
    public_and_private = open_stream(service.url, ["public", mine], timeout=5)
    assert public_and_private.status == 401
    clients = [
        SSEClient(stream_url(service.url, [mine, team]), {"Authorization": f"Bearer {good}"}).start(),
        SSEClient(stream_url(service.url, [mine, team]), {"Cookie": f"herald_token={good}"}).start(),
        SSEClient(stream_url(service.url, [mine, team]) + f"&token={good}").start(),
    ]
    try:
        assert [c.status for c in clients] == [200, 200, 200]
        for c in clients:
            assert c.wait_for(partial(lambda c: c.retry is not None, c))
        sent = [publish(mine, 1), publish(team, 2)]
        for c in clients:
            assert [e.id for e in c.wait_events(2)] == sent
    finally:
        for c in clients:
            c.close()


def test_public_channels_need_no_token(start: Callable[..., Service]) -> None:
    service = start("stream", SUBSCRIBE_SECRET=SECRET)
    client = open_stream(service.url, ["public-news"])
    assert client.status == 200
    client.close()


def test_private_channels_are_refused_without_a_secret(stream: Service) -> None:
    answer = requests.get(f"{stream.url}/stream?channel=private-x&token=abc", timeout=5)
    assert answer.status_code == 403 and answer.json()["error"] == "private_channels_disabled"


def test_an_expired_token_ends_the_stream_at_expiry(start: Callable[..., Service]) -> None:
    service = start("stream", SUBSCRIBE_SECRET=SECRET, HEARTBEAT_SECONDS="5")
    began = time.monotonic()
    client = SSEClient(
        stream_url(service.url, ["private-a"]) + f"&token={token(['private-a'], ttl=2)}"
    ).start()
    assert client.status == 200
    assert client.wait_for(lambda: client.ended is not None, timeout=10)
    assert client.ended == "eof"
    assert [e.event for e in client.events] == ["token_expired"]
    assert 1.0 <= time.monotonic() - began < 6


def test_idempotency_key_replays_the_first_answer_and_stores_nothing_new(
    publisher: Service, stream: Service, channel: str
) -> None:
    client = open_stream(stream.url, [channel])
    try:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        body = [{"channel": channel, "data": 1}, {"channel": channel, "data": 2}]
        first = post_events(publisher.url, body, headers=key)
        again = post_events(publisher.url, body, headers=key)
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        other = post_events(publisher.url, [{"channel": channel, "data": 3}], headers=key)
        assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
        fresh = post_events(publisher.url, {"channel": channel, "data": 4})
        # Subscribers saw the batch once, then the next event.
        got = client.wait_events(3)
        assert [e.data for e in got] == ["1", "2", "4"]
        assert got[2].id == fresh.json()["id"]
        bad = post_events(publisher.url, body, headers={"Idempotency-Key": "with space"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_idempotency_key"
    finally:
        client.close()


def test_cors_exact_origins_get_credentials_and_wildcard_never_does(
    start: Callable[..., Service], channel: str
) -> None:
    origins = "https://app.example,*"
    pub = start("publisher", CORS_ALLOWED_ORIGINS=origins)
    sse = start("stream", CORS_ALLOWED_ORIGINS=origins)
    preflight = requests.options(
        f"{pub.url}/publish",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
        timeout=5,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    anyone = post_events(pub.url, {"channel": channel, "data": 1}, headers={"Origin": "https://x.example"})
    assert anyone.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in anyone.headers
    exact = SSEClient(stream_url(sse.url, [channel]), {"Origin": "https://app.example"}).start()
    wild = SSEClient(stream_url(sse.url, [channel]), {"Origin": "https://x.example"}).start()
    try:
        assert exact.response_headers["access-control-allow-origin"] == "https://app.example"
        assert exact.response_headers["access-control-allow-credentials"] == "true"
        assert wild.response_headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in wild.response_headers
    finally:
        exact.close()
        wild.close()


def test_no_cors_headers_for_origins_not_allowed(start: Callable[..., Service], channel: str) -> None:
    pub = start("publisher", CORS_ALLOWED_ORIGINS="https://app.example")
    answer = post_events(pub.url, {"channel": channel, "data": 1}, headers={"Origin": "https://evil.example"})
    # Refused outright (docs/api.md, "Who may publish"), and without CORS headers.
    assert answer.status_code == 403 and answer.json()["error"] == "cross_site"
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_metrics_count_across_workers(start: Callable[..., Service], channel: str) -> None:
    pub = start("publisher", WEB_CONCURRENCY="2")
    sse = start("stream", WEB_CONCURRENCY="1")
    client = open_stream(sse.url, [channel])
    try:
        for i in range(10):
            assert post_events(pub.url, {"channel": channel, "data": i}).status_code == 202
        client.wait_events(10)
        published = requests.get(f"{pub.url}/metrics", timeout=5).text
        assert "herald_events_published_total 10.0" in published
        assert "herald_publish_duration_seconds_count 10.0" in published
        streamed = requests.get(f"{sse.url}/metrics", timeout=5).text
        assert "herald_stream_clients 1.0" in streamed
        assert "herald_events_delivered_total 10.0" in streamed
    finally:
        client.close()


def test_logs_are_json_lines_with_the_request_id(start: Callable[..., Service], channel: str) -> None:
    pub = start("publisher", PUBLISH_TOKEN="secret-token-value")
    rid = uuid.uuid4().hex
    answer = post_events(pub.url, {"channel": channel, "data": 1}, headers={"X-Request-ID": rid})
    assert answer.status_code == 401
    assert answer.headers["X-Request-ID"] == rid
    lines = [json.loads(line) for line in pub.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert "secret-token-value" not in pub.log()


def test_a_timed_out_publish_is_retried_exactly_once_with_its_idempotency_key(
    start: Callable[..., Service], stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    pub = start("publisher", REDIS_TIMEOUT_SECONDS="0.5")
    client = open_stream(stream.url, [channel])
    try:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        # Redis freezes: the publisher cannot know whether its script ran.
        redis_client.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        first = post_events(pub.url, {"channel": channel, "data": "once"}, headers=key)
        assert first.status_code == 503 and first.json()["error"] == "redis_timeout"
        assert int(first.headers["Retry-After"]) >= 1
        # Whether or not the script ran, retrying with the same key publishes it once.
        deadline = time.monotonic() + 10
        while (
            retry := post_events(pub.url, {"channel": channel, "data": "once"}, headers=key)
        ).status_code == 503:
            assert time.monotonic() < deadline, retry.text
            time.sleep(0.2)
        assert retry.status_code == 202, retry.text
        (event,) = client.wait_events(1, timeout=10)
        assert retry.json()["id"] == event.id and event.data == '"once"'
        assert not client.wait_for(lambda: len(client.events) > 1, timeout=1)
        assert redis_client.xlen(keys.stream_key(channel)) == 1
    finally:
        client.close()
