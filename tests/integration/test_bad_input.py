"""Bad input of every kind: never a 5xx, never a broken frame, nothing accepted is lost."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import post_events
from tests.support import keys
from tests.support import strict_input as strict
from tests.support.services import Service, start_service
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


# -- every request parameter of both services (issue 16: strict parsing) -------------
#
# Unicode digits, huge values, repeated parameters, percent-encoded names, odd
# bytes, in every parameter and header /stream, /history, /publish and
# /channels/<x> read: never a 5xx, and every 4xx a JSON error.

STRICT_SECRET = "strict-input-secret-" + uuid.uuid4().hex
STRICT_ORIGIN = "https://app.example"


def signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, STRICT_SECRET, algorithm="HS256")


FAR = 4102444800  # 2100-01-01
subscribe_tokens = st.sampled_from(
    [
        signed({"channels": ["private-x"], "exp": FAR}),
        signed({"channels": ["private-*"], "exp": FAR}),
        signed({"channels": ["private-x"], "exp": "9999999999"}),
        signed({"channels": ["private-x"], "exp": 1e300}),
        signed({"channels": ["private-x"]}),
        signed({"channels": ["private-x"], "exp": FAR, "nbf": "0", "iat": []}),
        signed({"channels": "private-x", "exp": FAR}),
        signed({"channels": [["private-x"]], "exp": FAR}),
        signed({"channels": ["private-[x]", "private-?"], "exp": FAR, "aud": "x"}),
        jwt.encode({"channels": ["private-x"], "exp": FAR}, "another-secret-" + "0" * 32, algorithm="HS256"),
        jwt.encode({"channels": ["private-x"], "exp": FAR}, "", algorithm="none"),
    ]
)


@pytest.fixture(scope="module")
def strict_stream(redis_url: str, logs_dir: Path) -> Iterator[Service]:
    """A stream service with private channels and CORS on."""
    service = start_service(
        "stream",
        redis_url,
        logs_dir,
        SUBSCRIBE_SECRET=STRICT_SECRET,
        CORS_ALLOWED_ORIGINS=STRICT_ORIGIN,
        HEARTBEAT_SECONDS="1",
    )
    yield service
    service.stop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=strict.stream_calls(subscribe_tokens))
def test_any_stream_request_is_answered_200_or_json_4xx(strict_stream: Service, call: strict.Call) -> None:
    strict.check_answer(call, call.send(strict_stream.url))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=strict.history_calls(subscribe_tokens))
def test_any_history_request_is_answered_200_or_json_4xx(strict_stream: Service, call: strict.Call) -> None:
    strict.check_answer(call, call.send(strict_stream.url))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=strict.publish_calls(CHANNELS))
def test_any_publish_form_key_or_content_type_is_answered_2xx_or_json_4xx(
    publisher: Service, call: strict.Call
) -> None:
    strict.check_answer(call, call.send(publisher.url))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=strict.channel_calls())
def test_any_presence_request_is_answered_2xx_or_json_4xx(publisher: Service, call: strict.Call) -> None:
    strict.check_answer(call, call.send(publisher.url))


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("channel=a&limit=%C2%B2", "invalid_limit"),  # '²': was a 500
        ("channel=a&limit=%D9%A3", "invalid_limit"),  # Arabic-Indic three
        ("channel=a&limit=%EF%BC%91", "invalid_limit"),  # full-width one
        ("channel=a&limit=" + "9" * 400, "invalid_limit"),
        ("channel=a&limit=1&limit=2", "duplicate_parameter"),
        ("channel=a&after=000000000000-1&after=000000000000-2", "duplicate_parameter"),
        ("channel=a&token=x&tok%65n=y", "duplicate_parameter"),
        ("channel=a&after=000000000000-%C2%B2", "invalid_after"),
    ],
)
def test_history_numbers_are_ascii_and_single(strict_stream: Service, query: str, code: str) -> None:
    answer = requests.get(f"{strict_stream.url}/history?{query}", timeout=5)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == code


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("channel=a&lastEventId=000000000000-%C2%B2", "invalid_last_event_id"),
        ("channel=a&lastEventId=000000000000-1&lastEventId=000000000000-2", "duplicate_parameter"),
        ("channel=private-x&token=a&token=b", "duplicate_parameter"),
    ],
)
def test_stream_numbers_are_ascii_and_single(strict_stream: Service, query: str, code: str) -> None:
    answer = requests.get(f"{strict_stream.url}/stream?{query}", timeout=5)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == code


def test_a_string_exp_no_longer_opens_a_never_ending_stream(strict_stream: Service) -> None:
    for claims in ({"channels": ["private-x"], "exp": "9999999999"}, {"channels": ["private-x"]}):
        answer = requests.get(
            f"{strict_stream.url}/stream?channel=private-x",
            headers={"Authorization": f"Bearer {signed(claims)}"},
            timeout=5,
        )
        assert answer.status_code == 401 and answer.json()["error"] == "invalid_token", claims
    narrow = signed({"channels": ["private-x1*"], "exp": FAR})
    ok = SSEClient(f"{strict_stream.url}/stream?channel=private-x10", {"Authorization": f"Bearer {narrow}"})
    try:
        assert ok.start().status == 200  # a trailing * is a prefix
    finally:
        ok.close()
    literal = signed({"channels": ["private-x?", "private-x[0-9]"], "exp": FAR})
    refused = requests.get(
        f"{strict_stream.url}/stream?channel=private-x1",
        headers={"Authorization": f"Bearer {literal}"},
        timeout=5,
    )
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden_channel"


def test_a_short_subscribe_secret_stops_the_service_at_start(redis_url: str, logs_dir: Path) -> None:
    with pytest.raises(RuntimeError) as failed:
        start_service("stream", redis_url, logs_dir, ready=False, SUBSCRIBE_SECRET="too-short")
    assert "SUBSCRIBE_SECRET must be at least 32 bytes" in str(failed.value)


def test_audience_and_issuer_when_configured(start: Callable[..., Service]) -> None:
    service = start(
        "stream", SUBSCRIBE_SECRET=STRICT_SECRET, SUBSCRIBE_AUDIENCE="herald", SUBSCRIBE_ISSUER="app"
    )
    good = {"channels": ["private-x"], "exp": FAR, "aud": "herald", "iss": "app"}
    for claims, status in [
        (good, 200),
        ({**good, "aud": "other"}, 401),
        ({**good, "iss": "other"}, 401),
        ({k: v for k, v in good.items() if k != "aud"}, 401),
    ]:
        client = SSEClient(
            f"{service.url}/stream?channel=private-x", {"Authorization": f"Bearer {signed(claims)}"}
        )
        try:
            assert client.start().status == status, claims
        finally:
            client.close()


@pytest.mark.parametrize("path", ["/stream?channel=private-x", "/history?channel=private-x"])
def test_cors_preflight_for_headers(strict_stream: Service, path: str) -> None:
    preflight = requests.options(
        f"{strict_stream.url}{path}",
        headers={
            "Origin": STRICT_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        },
        timeout=5,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == STRICT_ORIGIN
    assert preflight.headers["Access-Control-Allow-Headers"] == "Authorization, Last-Event-ID"
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, HEAD"
    assert int(preflight.headers["Access-Control-Max-Age"]) >= 60
    other = requests.options(
        f"{strict_stream.url}{path}",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=5,
    )
    assert other.status_code == 403 and other.json()["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in other.headers
    # A refusal is readable from the allowed origin, its Retry-After too.
    refused = requests.get(f"{strict_stream.url}{path}", headers={"Origin": STRICT_ORIGIN}, timeout=5)
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == STRICT_ORIGIN
    assert refused.headers["Access-Control-Expose-Headers"] == "Retry-After"


def test_line_separators_in_data_are_escaped_on_the_wire(
    stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    """Written straight to Redis (past the publisher's own escaping): raw U+2028,
    U+2029 and U+0085 inside a JSON string leave as JSON escapes."""
    client = open_stream(stream.url, [channel])
    try:
        epoch = client.last_id.rsplit("-", 1)[0]
        seq = redis_client.hincrby(keys.meta_key(channel), "seq", 1)
        data = json.dumps({"s": "a\u2028event: forged\u2029id: 1\u0085b"}, ensure_ascii=False)
        redis_client.spublish(keys.live_key(channel), f"{epoch} {seq} message {data}".encode())
        (event,) = client.wait_events(1)
        assert event.data == data.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace(
            "\u0085", "\\u0085"
        )
        assert json.loads(event.data) == json.loads(data)
        assert event.event == "message" and event.id == f"{epoch}-{seq}"
    finally:
        client.close()
