"""Bad input of every kind: never a 5xx, never a broken frame, nothing accepted is lost."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import post_events
from tests.support import keys
from tests.support.services import Service
from tests.support.sse_client import SSEClient, open_stream

PREFIX = "prop." + uuid.uuid4().hex[:8]
CHANNELS = [f"{PREFIX}.{i}" for i in range(4)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(CHANNELS) | st.text(max_size=140)
event_names = st.sampled_from(["message", "created", "a.b:c-d_e"]) | st.text(max_size=70)
events = st.fixed_dictionaries(
    {"channel": names, "data": json_values}, optional={"event": event_names, "extra": st.integers()}
)
bodies = st.one_of(
    events,
    st.lists(events, max_size=5),
    st.lists(events, min_size=101, max_size=103),
    json_values,
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "",
        "multipart/form-data",
        "application/x-www-form-urlencoded",
    ]
)


@pytest.fixture(scope="module")
def watcher(stream: Service) -> Iterator[SSEClient]:
    """One subscriber of every channel the property test may publish to."""
    client = open_stream(stream.url, CHANNELS)
    yield client
    client.close()


def check_answer(answer: requests.Response) -> None:
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert answer.headers["Content-Type"] == "application/json"
        body = answer.json()
        assert set(body) == {"error", "message"} and body["message"]


def expect_delivery(watcher: SSEClient, sent: list[dict[str, Any]], ids: list[str]) -> None:
    """Every accepted event reaches the subscriber exactly as sent."""

    def arrived(event_id: str) -> bool:
        return any(e.id == event_id for e in watcher.events)

    for item, event_id in zip(sent, ids, strict=True):
        if item["channel"] not in CHANNELS:
            continue  # a valid name the generator made up; nobody watches it
        assert watcher.wait_for(partial(arrived, event_id), 10)
        (got,) = [e for e in watcher.events if e.id == event_id]
        assert json.loads(got.data) == item["data"]
        assert got.event == item.get("event", "message")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=content_types)
def test_any_publish_is_answered_2xx_or_json_4xx(
    publisher: Service, watcher: SSEClient, body: Any, content_type: str
) -> None:
    answer = post_events(publisher.url, json.dumps(body), headers={"Content-Type": content_type})
    check_answer(answer)
    if answer.status_code == 202:
        sent = body if isinstance(body, list) else [body]
        result = answer.json()
        ids = [e["id"] for e in result["events"]] if isinstance(body, list) else [result["id"]]
        expect_delivery(watcher, sent, ids)


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=300), content_type=content_types)
def test_arbitrary_bytes_never_cause_a_5xx(publisher: Service, raw: bytes, content_type: str) -> None:
    check_answer(post_events(publisher.url, raw, headers={"Content-Type": content_type}))


@pytest.mark.parametrize(
    "body",
    [
        b'{"channel": "c", "data": 1, "data": 2}',
        b'{"channel": "c", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"channel": "c", "data": "\xff\xfe"}',
        b'{"channel": "c", "data": NaN}',
        b'{"channel": "c", "data": "\\ud800"}',
        b"",
        b"   ",
        b"[]",
        b"null",
    ],
)
def test_nasty_json_is_refused_clearly(publisher: Service, body: bytes) -> None:
    answer = post_events(publisher.url, body)
    assert 400 <= answer.status_code < 500
    check_answer(answer)


INJECTIONS = [
    "a\rb",
    "a\nb",
    "a\r\nb",
    "x\n\ndata: forged",
    "x\nid: 999\nevent: reset\n\n",
    "nul\u0000byte",
    "\n",
    ": comment\n",
    "retry: 1\n",
]


def test_sse_injection_through_the_publisher_cannot_forge_fields(
    stream: Service, publisher: Service, channel: str
) -> None:
    client = open_stream(stream.url, [channel])
    try:
        ids = []
        for data in INJECTIONS:
            answer = post_events(publisher.url, {"channel": channel, "data": data})
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
        got = client.wait_events(len(INJECTIONS))
        assert [e.id for e in got] == ids
        assert [json.loads(e.data) for e in got] == INJECTIONS
        assert {e.event for e in got} == {"message"}
        assert client.retry == 3000
    finally:
        client.close()


def test_raw_newlines_written_straight_to_redis_still_make_one_event(
    stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    # Someone bypasses the publisher's validation (but takes a sequence number
    # as the contract says): data with raw line breaks in Pub/Sub.
    client = open_stream(stream.url, [channel])
    try:
        epoch = client.last_id.rsplit("-", 1)[0]
        seq = redis_client.hincrby(keys.meta_key(channel), "seq", 1)
        payload = f"{epoch} {seq} message line1\r\nid: 1\nevent: reset\rdata: x"
        redis_client.spublish(keys.live_key(channel), payload)
        (event,) = client.wait_events(1)
        assert event.event == "message" and event.id == f"{epoch}-{seq}"
        assert event.data == "line1\nid: 1\nevent: reset\ndata: x"
    finally:
        client.close()


def test_malformed_stream_requests_get_4xx_and_the_worker_keeps_serving(
    stream: Service, publisher: Service, channel: str
) -> None:
    for query in [
        f"channel={channel}&lastEventId=" + "9" * 40,
        f"channel={channel}&lastEventId=abcdef012345-1-2",
        f"channel={channel}&lastEventId=%00",
        "channel=%0d%0a",
        "channel=" + "x" * 5000,
    ]:
        answer = requests.get(f"{stream.url}/stream?{query}", timeout=5)
        assert 400 <= answer.status_code < 500, query
    # Oversized request line and headers: gunicorn refuses them before the app.
    huge = requests.get(f"{stream.url}/stream?channel={channel}&pad={'y' * 9000}", timeout=5)
    assert 400 <= huge.status_code < 500
    with socket.create_connection(("127.0.0.1", stream.port)) as raw:
        raw.sendall(b"GET /stream?channel=a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"z" * 20000 + b"\r\n\r\n")
        assert raw.recv(64).startswith(b"HTTP/1.1 4")
    # Repeated and unknown parameters are fine: channels are de-duplicated.
    client = open_stream(stream.url, [channel, channel, channel], timeout=5)
    try:
        assert client.status == 200
        sent = post_events(publisher.url, {"channel": channel, "data": "still serving"}).json()["id"]
        assert [e.id for e in client.wait_events(1)] == [sent]
    finally:
        client.close()
