"""The stream service against real Redis and a real gunicorn + gevent worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import stats
from tests.support.services import Service, eventually
from tests.support.sse_client import open_stream


def test_stream_headers_preamble_and_position(stream: Service, channel: str) -> None:
    client = open_stream(stream.url, [channel])
    try:
        assert client.status == 200
        assert client.response_headers["content-type"].startswith("text/event-stream")
        assert client.response_headers["cache-control"] == "no-cache"
        assert client.response_headers["x-accel-buffering"] == "no"
        assert client.retry == 3000
        # The first bytes are a comment (flushes headers through proxies), then retry.
        assert client.raw.startswith(b": ok\n\nretry: 3000\n\n")
        # An id-only frame gives a fresh client its resume point before any event.
        assert client.wait_for(lambda: client.last_id != "")
        assert client.events == []
    finally:
        client.close()


def test_events_on_several_channels_arrive_in_publish_order(
    stream: Service, publish: Callable[..., str], channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    client = open_stream(stream.url, [a, b])
    try:
        sent = [publish(a if i % 3 else b, {"n": i}, event="tick") for i in range(30)]
        got = client.wait_events(30)
        assert [e.id for e in got] == sent
        assert [e.json()["n"] for e in got] == list(range(30))
        assert {e.event for e in got} == {"tick"}
    finally:
        client.close()


def test_heartbeat_comments_keep_an_idle_stream_alive(stream: Service, channel: str) -> None:
    client = open_stream(stream.url, [channel])
    try:
        # HEARTBEAT_SECONDS=1 for the session's stream service.
        assert client.wait_for(lambda: client.comments.count("hb") >= 2, timeout=5)
    finally:
        client.close()


def test_multiline_and_unicode_data_survive_the_frame(
    stream: Service, publish: Callable[..., str], channel: str
) -> None:
    client = open_stream(stream.url, [channel])
    try:
        value = {"text": "line one\nline two\r\nline three\rend", "emoji": "héllo ✓ 🚀", "nul": "a\u0000b"}
        publish(channel, value)
        (event,) = client.wait_events(1)
        assert event.json() == value
    finally:
        client.close()


def test_bad_stream_requests_get_json_400(stream: Service) -> None:
    cases = {
        "": "missing_channel",
        "channel=": "invalid_channel",
        "channel=bad%20name": "invalid_channel",
        "channel=" + "x" * 129: "invalid_channel",
        "&".join(f"channel=c{i}" for i in range(17)): "too_many_channels",
        "channel=a&lastEventId=nonsense": "invalid_last_event_id",
        "channel=a&lastEventId=0123456789ab-": "invalid_last_event_id",
    }
    for query, code in cases.items():
        answer = requests.get(f"{stream.url}/stream?{query}", timeout=5)
        assert answer.status_code == 400, query
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"] == code, query
        assert answer.json()["message"]
    bad_header = requests.get(f"{stream.url}/stream?channel=a", headers={"Last-Event-ID": "12-x"}, timeout=5)
    assert bad_header.status_code == 400
    assert bad_header.json()["error"] == "invalid_last_event_id"


def test_connection_limit_answers_503_with_retry_after(start: Callable[..., Service], channel: str) -> None:
    service = start("stream", MAX_CONNECTIONS="2")
    first, second = open_stream(service.url, [channel]), open_stream(service.url, [channel])
    try:
        third = requests.get(f"{service.url}/stream?channel={channel}", timeout=5)
        assert third.status_code == 503
        assert third.json()["error"] == "too_many_connections"
        assert int(third.headers["Retry-After"]) >= 1
    finally:
        first.close()
        second.close()
    # Once a slot is free, streams are accepted again.
    assert eventually(lambda: stats(service)["clients"] == 0, timeout=5)
    again = open_stream(service.url, [channel])
    assert again.status == 200
    again.close()


def test_health_and_readiness(stream: Service, publisher: Service) -> None:
    for service in (stream, publisher):
        assert requests.get(f"{service.url}/healthz", timeout=5).json() == {"status": "ok"}
        assert requests.get(f"{service.url}/readyz", timeout=5).json() == {"status": "ready"}


def test_only_get_opens_a_stream(stream: Service, channel: str) -> None:
    url = f"{stream.url}/stream?channel={channel}"
    head = requests.head(url, timeout=5)
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("text/event-stream")
    assert head.headers["cache-control"] == "no-cache"
    assert "content-length" not in head.headers
    assert stats(stream)["clients"] == 0, "HEAD left a subscriber attached"
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        answer = requests.request(method, url, timeout=5)
        assert answer.status_code == 405, method
        assert answer.headers["content-type"] == "application/json", method
        assert answer.json()["error"] == "method_not_allowed", method
        assert set(answer.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}, method
        assert stats(stream)["clients"] == 0, f"{method} left a subscriber attached"
    # OPTIONS answers CORS preflights (stream/cors.py); without an Origin, just Allow.
    options = requests.options(url, timeout=5)
    assert options.status_code == 204
    assert set(options.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}
    assert stats(stream)["clients"] == 0, "OPTIONS left a subscriber attached"
    # A bad HEAD gets the status a GET would get, still without a body.
    assert requests.head(f"{stream.url}/stream", timeout=5).status_code == 400
    # And GET still opens one.
    client = open_stream(stream.url, [channel])
    try:
        assert client.status == 200
        assert eventually(lambda: stats(stream)["clients"] == 1, timeout=5)
    finally:
        client.close()
    assert eventually(lambda: stats(stream)["clients"] == 0, timeout=5)


def test_connection_limit_holds_for_streams_opened_together(
    start: Callable[..., Service], channel: str
) -> None:
    # A fresh worker: every stream waits for the hub's first connection to Redis,
    # so all of them are in flight at once; only MAX_CONNECTIONS may get through.
    service = start("stream", MAX_CONNECTIONS="2")
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: open_stream(service.url, [channel]), range(8)))
    try:
        statuses = sorted(c.status or 0 for c in clients)
        assert statuses == [200, 200] + [503] * 6, statuses
        refused = [c for c in clients if c.status == 503]
        assert all(json.loads(c.body)["error"] == "too_many_connections" for c in refused)
        assert stats(service)["clients"] == 2
    finally:
        for client in clients:
            client.close()
    assert eventually(lambda: stats(service)["clients"] == 0, timeout=5)


def test_a_multi_channel_stream_names_each_events_channel_and_a_single_one_does_not(
    stream: Service, publish: Callable[..., str], channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    both = open_stream(stream.url, [a, b])
    only_a = open_stream(stream.url, [a])
    try:
        first = publish(a, {"n": 1}, event="created")
        second = publish(b, [1, "two"])
        both.wait_events(2)
        only_a.wait_events(1)
        # On the wire, as a plain EventSource sees it: the same event names, the
        # data wrapped with its channel on a multi-channel stream only.
        assert (
            f'id: {first}\nevent: created\ndata: {{"channel":"{a}","data":{{"n":1}}}}\n\n'.encode()
            in both.raw
        )
        assert (
            f'id: {second}\nevent: message\ndata: {{"channel":"{b}","data":[1,"two"]}}\n\n'.encode()
            in both.raw
        )
        assert f'id: {first}\nevent: created\ndata: {{"n":1}}\n\n'.encode() in only_a.raw
        assert [(e.channel, e.json()) for e in both.events] == [(a, {"n": 1}), (b, [1, "two"])]
    finally:
        both.close()
        only_a.close()
