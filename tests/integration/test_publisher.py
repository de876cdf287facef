"""The publisher against real Redis and a real gunicorn + gevent worker.

Every answer is checked for its exact status, its JSON error body and, where it
matters, what did (or did not) land in Redis.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.client
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import post_events
from tests.support import keys
from tests.support.docker import REDIS_IMAGE, require_docker
from tests.support.services import Service, eventually, free_port

ID_RE = re.compile(r"([0-9a-f]{12})-([1-9][0-9]*)")
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CLOSE = {"Connection": "close"}


def seq_of(event_id: str) -> int:
    match = ID_RE.fullmatch(event_id)
    assert match, event_id
    return int(match[2])


def epoch_of(event_id: str) -> str:
    match = ID_RE.fullmatch(event_id)
    assert match, event_id
    return match[1]


def history(client: redis.Redis, channel: str, partitions: int = 1) -> list[tuple[str, dict[str, str]]]:
    """The channel's stream entries, decoded: [(entry id, {field: value})]."""
    raw: Any = client.xrange(keys.stream_key(channel, partitions))
    return [
        (entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}) for entry_id, fields in raw
    ]


def assert_error(answer: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A JSON error answer: exact status, Content-Type, and exactly {"error", "message"}."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"] == "application/json", answer.headers
    body = answer.json()
    assert isinstance(body, dict)
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body


def post_raw(base: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    # Connection: close, like post_events: no idle keep-alive connection delays a service's stop.
    return requests.post(
        f"{base}/publish", data=body, headers={"Connection": "close", **(headers or {})}, timeout=10
    )


@pytest.fixture
def limited(start: Callable[..., Service]) -> Service:
    """A publisher with small limits."""
    return start("publisher", MAX_EVENT_BYTES="100", MAX_BATCH="3", MAX_BODY_BYTES="1000")


# -- accepted requests -------------------------------------------------------------


def test_single_json_event_is_accepted_and_stored(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    answer = post_events(publisher.url, {"channel": channel, "data": {"b": [1, 2], "a": "x y"}})
    assert answer.status_code == 202, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert set(body) == {"id", "channel"}
    assert body["channel"] == channel
    match = ID_RE.fullmatch(body["id"])
    assert match, body["id"]
    epoch, seq = match[1], int(match[2])
    assert redis_client.hget(keys.meta_key(channel), "epoch") == epoch.encode()
    assert int(redis_client.hget(keys.meta_key(channel), "seq") or 0) >= seq
    assert redis_client.hget(keys.meta_key(channel), "partitions") == b"1"
    # `prev` is 0: the channel had no event before this one.
    assert history(redis_client, channel) == [
        (f"{seq}-0", {"event": "message", "data": '{"b":[1,2],"a":"x y"}', "prev": "0"})
    ]
    assert redis_client.hget(keys.channels_key(channel), channel) == str(seq).encode()


def test_event_name_and_unicode_data_are_stored_as_utf8_json(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    data = {"text": "héllo ✓ 🚀", "lines": "a\r\nb\x00"}
    body = json.dumps({"channel": channel, "event": "user.joined", "data": data}, ensure_ascii=False)
    answer = post_raw(publisher.url, body.encode("utf-8"), JSON)
    assert answer.status_code == 202, answer.text
    ((entry_id, fields),) = history(redis_client, channel)
    assert entry_id == f"{seq_of(answer.json()['id'])}-0"
    assert fields["event"] == "user.joined"
    assert fields["data"] == '{"text":"héllo ✓ 🚀","lines":"a\\r\\nb\\u0000"}'
    assert json.loads(fields["data"]) == data


def test_json_with_a_charset_parameter_is_accepted(publisher: Service, channel: str) -> None:
    answer = post_events(
        publisher.url,
        {"channel": channel, "data": 1},
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert answer.status_code == 202, answer.text


def test_batch_ids_are_in_order_and_strictly_increasing(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    items: list[dict[str, Any]] = [
        {"channel": a if i % 2 else b, "event": f"e{i}", "data": i} for i in range(7)
    ]
    answer = post_events(publisher.url, items)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert set(body) == {"events"}
    assert [e["channel"] for e in body["events"]] == [item["channel"] for item in items]
    assert all(set(e) == {"id", "channel"} for e in body["events"])
    seqs = [seq_of(e["id"]) for e in body["events"]]
    assert all(x < y for x, y in itertools.pairwise(seqs))
    # One atomic script: nothing else can take a number in the middle of the batch.
    assert seqs == list(range(seqs[0], seqs[0] + len(items)))
    assert len({e["id"].split("-")[0] for e in body["events"]}) == 1
    stored = history(redis_client, a) + history(redis_client, b)
    by_seq = {int(entry_id.split("-")[0]): fields for entry_id, fields in stored}
    assert sorted(by_seq) == seqs
    previous = {a: 0, b: 0}  # each entry names the seq of its channel's previous event
    for seq, item in zip(seqs, items, strict=True):
        prev = previous[item["channel"]]
        assert by_seq[seq] == {"event": item["event"], "data": str(item["data"]), "prev": str(prev)}
        previous[item["channel"]] = seq
    assert redis_client.hget(keys.channels_key(a), a) == str(previous[a]).encode()
    assert redis_client.hget(keys.channels_key(b), b) == str(previous[b]).encode()


def test_form_body_like_curl_sends_stores_data_as_a_json_string(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    # What `curl -d channel=... -d event=note -d 'data=hello world {"a": 1}'` sends.
    body = f'channel={channel}&event=note&data=hello world {{"a": 1}}'.encode()
    answer = post_raw(publisher.url, body, FORM)
    assert answer.status_code == 202, answer.text
    assert answer.json()["channel"] == channel
    # And with --data-urlencode: '+' and %XX are decoded.
    answer2 = post_raw(publisher.url, f"channel={channel}&data=caf%C3%A9+%E2%9C%93%0Aok".encode(), FORM)
    assert answer2.status_code == 202, answer2.text
    assert answer2.json() == {"id": answer2.json()["id"], "channel": channel}
    (first_id, first), (_, second) = history(redis_client, channel)
    assert first == {"event": "note", "data": '"hello world {\\"a\\": 1}"', "prev": "0"}
    assert second == {"event": "message", "data": '"café ✓\\nok"', "prev": first_id.split("-")[0]}
    assert json.loads(second["data"]) == "café ✓\nok"


# -- 400 --------------------------------------------------------------------------

BAD_JSON: dict[str, tuple[bytes, str]] = {
    "malformed": (b'{"channel": "c", "data": ', "invalid_json"),
    "not json": (b"hello", "invalid_json"),
    "trailing garbage": (b'{"channel":"c","data":1} {}', "invalid_json"),
    "empty body": (b"", "invalid_json"),
    "blank body": (b"  \n ", "invalid_json"),
    "invalid utf-8": (b'{"channel":"c","data":"\xff"}', "invalid_json"),
    "utf-8 bom": (b'\xef\xbb\xbf{"channel":"c","data":1}', "invalid_json"),
    "NaN": (b'{"channel":"c","data":NaN}', "invalid_json"),
    "Infinity": (b'{"channel":"c","data":[-Infinity]}', "invalid_json"),
    "duplicate keys": (b'{"channel":"c","data":1,"data":2}', "invalid_json"),
    "nested duplicate keys": (b'{"channel":"c","data":{"k":1,"k":1}}', "invalid_json"),
    "batch duplicate keys": (b'[{"channel":"c","channel":"d","data":1}]', "invalid_json"),
    "deep nesting": (b"[" * 50_000 + b"]" * 50_000, "invalid_json"),
    "huge integer": (b'{"channel":"c","data":' + b"7" * 5000 + b"}", "invalid_json"),
    "missing data": (b'{"channel":"c"}', "invalid_event"),
    "missing channel": (b'{"data":1}', "invalid_event"),
    "channel not a string": (b'{"channel":1,"data":1}', "invalid_event"),
    "channel null": (b'{"channel":null,"data":1}', "invalid_event"),
    "event not a string": (b'{"channel":"c","event":["x"],"data":1}', "invalid_event"),
    "bad channel": (b'{"channel":"a b","data":1}', "invalid_event"),
    "empty channel": (b'{"channel":"","data":1}', "invalid_event"),
    "long channel": (b'{"channel":"' + b"x" * 129 + b'","data":1}', "invalid_event"),
    "unicode channel": ('{"channel":"café","data":1}'.encode(), "invalid_event"),
    "newline channel": (b'{"channel":"a\\nb","data":1}', "invalid_event"),
    "bad event name": (b'{"channel":"c","event":"a\\r\\nb","data":1}', "invalid_event"),
    "long event name": (b'{"channel":"c","event":"' + b"e" * 65 + b'","data":1}', "invalid_event"),
    "unknown field": (b'{"channel":"c","data":1,"id":"x"}', "invalid_event"),
    "lone surrogate": (b'{"channel":"c","data":"\\udc00"}', "invalid_event"),
    "overflowing number": (b'{"channel":"c","data":1e999}', "invalid_event"),
    "top-level string": (b'"hello"', "invalid_event"),
    "top-level null": (b"null", "invalid_event"),
    "empty batch": (b"[]", "empty_batch"),
    "batch item not an object": (b'[{"channel":"c","data":1}, 2]', "invalid_event"),
    "batch item array": (b'[[{"channel":"c","data":1}]]', "invalid_event"),
}


@pytest.mark.parametrize("case", BAD_JSON)
def test_bad_json_requests_get_400_with_a_json_error(
    publisher: Service, redis_client: redis.Redis, case: str
) -> None:
    body, code = BAD_JSON[case]
    seq_before = redis_client.hget(keys.meta_key("c"), "seq")
    assert_error(post_raw(publisher.url, body, JSON), 400, code)
    assert redis_client.hget(keys.meta_key("c"), "seq") == seq_before  # nothing was stored


BAD_FORMS: dict[str, tuple[bytes, str]] = {
    "missing data": (b"channel=c", "invalid_event"),
    "missing channel": (b"data=x", "invalid_event"),
    "repeated data": (b"channel=c&data=x&data=y", "invalid_event"),
    "repeated channel": (b"channel=c&channel=d&data=x", "invalid_event"),
    "unknown field": (b"channel=c&data=x&token=t", "invalid_event"),
    "bare word": (b"channel=c&data=x&oops", "invalid_event"),
    "bad channel": (b"channel=a%20b&data=x", "invalid_event"),
    "bad event": (b"channel=c&event=a%0Ab&data=x", "invalid_event"),
    "invalid utf-8": (b"channel=c&data=\xff", "invalid_form"),
    "empty": (b"", "invalid_event"),
}


@pytest.mark.parametrize("case", BAD_FORMS)
def test_bad_form_requests_get_400_with_a_json_error(publisher: Service, case: str) -> None:
    body, code = BAD_FORMS[case]
    assert_error(post_raw(publisher.url, body, FORM), 400, code)


def test_nesting_around_the_recursion_limit_is_never_a_500(publisher: Service, channel: str) -> None:
    depths = [*range(900, 1100, 7), 2000, 10_000]
    for depth in depths:
        for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"0" + b"}" * depth):
            body = b'{"channel":"' + channel.encode() + b'","data":' + data + b"}"
            answer = post_raw(publisher.url, body, JSON)
            assert answer.status_code in (202, 400), (depth, answer.status_code, answer.text)
            if answer.status_code == 400:
                assert_error(answer, 400)
    assert "unexpected error" not in publisher.log()


# -- 413 --------------------------------------------------------------------------


def test_event_over_max_event_bytes_is_413(limited: Service, redis_client: redis.Redis, channel: str) -> None:
    # The size is the UTF-8 size of the compact JSON: '"' + 98 chars + '"' is 100 bytes.
    assert post_events(limited.url, {"channel": channel, "data": "x" * 98}).status_code == 202
    assert_error(post_events(limited.url, {"channel": channel, "data": "x" * 99}), 413, "event_too_large")
    # 49 two-byte characters are 98 bytes + 2 quotes = 100; one more is over.
    assert post_events(limited.url, {"channel": channel, "data": "é" * 49}).status_code == 202
    assert_error(post_events(limited.url, {"channel": channel, "data": "é" * 50}), 413, "event_too_large")
    # Whitespace in the request does not count: the stored form is compact.
    ones = ", ".join(["1"] * 49)
    spaced = f'{{"channel": "{channel}", "data": [{ones}]}}'
    assert post_raw(limited.url, spaced.encode(), JSON).status_code == 202
    assert len(history(redis_client, channel)) == 3


def test_batch_over_max_batch_is_413(limited: Service, redis_client: redis.Redis, channel: str) -> None:
    item = {"channel": channel, "data": 1}
    assert post_events(limited.url, [item] * 3).status_code == 202
    assert_error(post_events(limited.url, [item] * 4), 413, "batch_too_large")
    assert len(history(redis_client, channel)) == 3


def test_body_over_max_body_bytes_is_413(limited: Service, channel: str) -> None:
    event = json.dumps({"channel": channel, "data": 1}).encode()
    exactly = event + b" " * (1000 - len(event))
    assert len(exactly) == 1000
    assert post_raw(limited.url, exactly, JSON).status_code == 202
    assert_error(post_raw(limited.url, exactly + b" ", JSON), 413, "body_too_large")
    # The body limit comes before the content type check and applies to forms too.
    assert_error(post_raw(limited.url, b"x" * 5000, {"Content-Type": "text/plain"}), 413, "body_too_large")
    assert_error(post_raw(limited.url, b"data=" + b"x" * 2000, FORM), 413, "body_too_large")


def test_chunked_body_over_max_body_bytes_is_413(limited: Service, channel: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield json.dumps({"channel": channel, "data": "x"}).encode()
        for _ in range(20):
            yield b" " * 100

    answer = requests.post(f"{limited.url}/publish", data=chunks(), headers={**JSON, **CLOSE}, timeout=10)
    assert_error(answer, 413, "body_too_large")


def test_small_chunked_body_is_accepted(limited: Service, redis_client: redis.Redis, channel: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield json.dumps({"channel": channel, "data": "chunked"}).encode()
        yield b"  "

    answer = requests.post(f"{limited.url}/publish", data=chunks(), headers={**JSON, **CLOSE}, timeout=10)
    assert answer.status_code == 202, answer.text
    assert history(redis_client, channel)[0][1]["data"] == '"chunked"'


def test_default_limits(publisher: Service, channel: str) -> None:
    assert post_events(publisher.url, [{"channel": channel, "data": 1}] * 100).status_code == 202
    assert_error(post_events(publisher.url, [{"channel": channel, "data": 1}] * 101), 413, "batch_too_large")
    big = {"channel": channel, "data": "x" * (65536 - 2)}
    assert post_events(publisher.url, big).status_code == 202
    assert_error(
        post_events(publisher.url, {"channel": channel, "data": "x" * 65535}), 413, "event_too_large"
    )
    assert_error(post_raw(publisher.url, b" " * (1048576 + 1), JSON), 413, "body_too_large")


# -- 415 --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "multipart/form-data; boundary=xyz",
        None,
        "application/xml",
        "application/merge-patch+json",
        "text/json",
    ],
)
def test_other_content_types_get_415(publisher: Service, channel: str, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"channel": channel, "data": 1}).encode()
    answer = post_raw(publisher.url, body, headers)
    if content_type is None:
        assert "Content-Type" not in answer.request.headers
    assert_error(answer, 415, "unsupported_media_type")


def test_real_multipart_upload_gets_415(publisher: Service, channel: str) -> None:
    answer = requests.post(
        f"{publisher.url}/publish",
        files={"data": ("d.txt", b"x")},
        data={"channel": channel},
        headers=CLOSE,
        timeout=10,
    )
    assert str(answer.request.headers["Content-Type"]).startswith("multipart/form-data")
    assert_error(answer, 415, "unsupported_media_type")


# -- 401 --------------------------------------------------------------------------


def test_publish_tokens(start: Callable[..., Service], redis_client: redis.Redis, channel: str) -> None:
    service = start("publisher", PUBLISH_TOKEN="tok1,tok2")
    event = {"channel": channel, "data": 1}
    refused = {
        "missing header": {},
        "wrong token": {"Authorization": "Bearer tok3"},
        "token prefix": {"Authorization": "Bearer tok"},
        "token with suffix": {"Authorization": "Bearer tok1x"},
        "both tokens": {"Authorization": "Bearer tok1,tok2"},
        "wrong scheme": {"Authorization": "Basic tok1"},
        "no scheme": {"Authorization": "tok1"},
        "empty bearer": {"Authorization": "Bearer "},
        "scheme only": {"Authorization": "Bearer"},
    }
    for case, headers in refused.items():
        answer = post_events(service.url, event, headers=headers)
        assert_error(answer, 401, "unauthorized")
        assert answer.headers["WWW-Authenticate"].startswith("Bearer"), case
    # Authentication comes before validation: a bad body without a token is still a 401.
    assert_error(post_raw(service.url, b"{", JSON), 401, "unauthorized")
    assert_error(post_raw(service.url, b"x", {"Content-Type": "text/plain"}), 401, "unauthorized")
    assert history(redis_client, channel) == []
    for token in ("tok1", "tok2"):
        answer = post_events(service.url, event, token=token)
        assert answer.status_code == 202, (token, answer.text)
    # The scheme is case-insensitive (RFC 9110).
    assert post_events(service.url, event, headers={"Authorization": "bearer tok2"}).status_code == 202
    assert len(history(redis_client, channel)) == 3
    # With tokens set, no warning about open publishing.
    assert "PUBLISH_TOKEN is empty" not in service.log()


def test_open_publishing_logs_a_startup_warning(publisher: Service) -> None:
    assert eventually(lambda: "PUBLISH_TOKEN is empty" in publisher.log(), timeout=5), publisher.log()


# -- 503 --------------------------------------------------------------------------


def test_redis_unreachable_gives_503_with_retry_after(start: Callable[..., Service], channel: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    service = start("publisher", redis_url_override=closed, ready=False, RETRY_AFTER_SECONDS="5")
    answer = post_events(service.url, {"channel": channel, "data": 1})
    assert_error(answer, 503, "redis_unavailable")
    assert answer.headers["Retry-After"] == "5"
    batch = post_events(service.url, [{"channel": channel, "data": 1}] * 2)
    assert_error(batch, 503, "redis_unavailable")
    # Validation still answers without Redis.
    assert_error(post_raw(service.url, b"{", JSON), 400, "invalid_json")
    ready = requests.get(f"{service.url}/readyz", headers=CLOSE, timeout=10)
    assert_error(ready, 503, "redis_unavailable")
    assert ready.headers["Retry-After"] == "5"
    assert requests.get(f"{service.url}/healthz", headers=CLOSE, timeout=5).json() == {"status": "ok"}
    assert "unexpected error" not in service.log()


# -- Idempotency-Key ----------------------------------------------------------------


def test_idempotency_key_errors_are_json(publisher: Service, redis_client: redis.Redis, channel: str) -> None:
    key = f"k-{channel}"
    event = {"channel": channel, "data": 1}
    first = post_events(publisher.url, event, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    # The same request again: the first answer, nothing stored twice.
    again = post_events(publisher.url, event, headers={"Idempotency-Key": key})
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    # The same key with another request: 422.
    other = post_events(publisher.url, {"channel": channel, "data": 2}, headers={"Idempotency-Key": key})
    assert_error(other, 422, "idempotency_key_reused")
    # A key outside 1-255 printable ASCII characters: 400.
    for bad in ("a b", "x" * 256, "tab\tkey"):
        answer = post_events(publisher.url, event, headers={"Idempotency-Key": bad})
        assert_error(answer, 400, "invalid_idempotency_key")
    assert len(history(redis_client, channel)) == 1
    # The record is the partition's: herald:{p0}:idem:<caller>:<key>.
    records = [k.decode() for k in redis_client.scan_iter(keys.idempotency_pattern(0), count=1000)]
    (record,) = [r for r in records if r.endswith(f":{key}")]
    assert record.startswith("herald:{p0}:idem:")
    assert redis_client.hget(record, "seqs") == str(seq_of(first.json()["id"])).encode()


# -- all or nothing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("third", "status"),
    [
        ({"channel": "bad name", "data": 3}, 400),
        ({"channel": "c", "data": 3, "extra": 1}, 400),
        ("not an object", 400),
        ({"channel": "c", "data": "x" * 70_000}, 413),
    ],
)
def test_a_batch_failing_in_its_third_item_stores_nothing(
    publisher: Service, redis_client: redis.Redis, channel: str, third: Any, status: int
) -> None:
    a, b = channel + ".a", channel + ".b"
    post_events(publisher.url, {"channel": a, "data": 0})  # a stream that already exists
    lengths = {c: redis_client.xlen(keys.stream_key(c)) for c in (a, b)}
    seq_before = redis_client.hget(keys.meta_key(a), "seq")
    if isinstance(third, dict) and third.get("channel") == "c":
        third = {**third, "channel": b}
    batch = [{"channel": a, "data": 1}, {"channel": b, "data": 2}, third, {"channel": a, "data": 4}]
    body = assert_error(post_events(publisher.url, batch), status)
    assert "item 2" in body["message"]
    assert {c: redis_client.xlen(keys.stream_key(c)) for c in (a, b)} == lengths
    assert lengths == {a: 1, b: 0}
    assert redis_client.hget(keys.meta_key(a), "seq") == seq_before


# -- partitions (contract version 2) ---------------------------------------------------


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    """A Redis of this module's own, as a URL without a database number (each test
    takes a database of its own). The session's Redis holds data written with
    PARTITIONS=1, which a publisher with another count refuses."""
    require_docker("the partition tests")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}"


def subscribe_sharded(pubsub: redis.client.PubSub, channels: list[str]) -> None:
    """SSUBSCRIBE to the channels and wait until Redis confirmed each."""
    pubsub.ssubscribe(*channels)
    confirmed = 0
    deadline = time.monotonic() + 10
    while confirmed < len(channels) and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message and message["type"] == "ssubscribe":
            confirmed += 1
    assert confirmed == len(channels), "the subscriptions were not confirmed"


def sharded_messages(pubsub: redis.client.PubSub, count: int) -> list[tuple[str, str]]:
    """The next `count` sharded messages: [(Pub/Sub channel, text)]."""
    received: list[tuple[str, str]] = []
    deadline = time.monotonic() + 10
    while len(received) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message and message["type"] == "smessage":
            received.append((message["channel"].decode(), message["data"].decode("utf-8")))
    assert len(received) == count, received
    return received


def idempotency_record(client: Any, partition: int, key: str) -> dict[str, str]:
    """The partition's record of an Idempotency-Key (whatever the caller part), decoded."""
    found = [k for k in client.scan_iter(match=keys.idempotency_pattern(partition), count=1000)]
    (record,) = [k for k in found if k.decode().endswith(f":{key}")]
    return {k.decode(): v.decode() for k, v in client.hgetall(record).items()}


def data_text(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def test_a_batch_over_several_partitions_is_stored_in_each_of_them(
    start: Callable[..., Service], own_redis: str
) -> None:
    url = f"{own_redis}/0"
    pub = start("publisher", redis_url_override=url, PARTITIONS="8")
    db = redis.Redis.from_url(url)
    a, b, c = keys.channels_in_distinct_partitions(f"t.{uuid.uuid4().hex[:8]}", 3, 8)
    pubsub = db.pubsub()
    try:
        subscribe_sharded(pubsub, [keys.live_key(ch, 8) for ch in (a, b, c)])
        batch: list[dict[str, Any]] = [
            {"channel": a, "event": "first", "data": {"n": 0, "s": "x y"}},
            {"channel": b, "data": 1},
            {"channel": a, "data": [2]},
            {"channel": c, "event": "e.3", "data": "three"},
            {"channel": b, "data": None},
        ]
        key = {"Idempotency-Key": uuid.uuid4().hex}
        answer = post_events(pub.url, batch, headers=key)
        assert answer.status_code == 202, answer.text
        ids = [e["id"] for e in answer.json()["events"]]
        assert [e["channel"] for e in answer.json()["events"]] == [item["channel"] for item in batch]
        live = sharded_messages(pubsub, len(batch))
    finally:
        pubsub.close()

    expected_live = []
    for ch in (a, b, c):  # the order in which the batch first names their partitions
        mine = [(i, item) for i, item in enumerate(batch) if item["channel"] == ch]
        raw: Any = db.hmget(keys.meta_key(ch, 8), "epoch", "seq")
        epoch, last = raw[0].decode(), int(raw[1])
        assert db.hget(keys.meta_key(ch, 8), "partitions") == b"8"
        # Each id is <epoch>-<seq> of the event's partition, numbered by that partition's counter.
        assert {epoch_of(ids[i]) for i, _ in mine} == {epoch}
        seqs = [seq_of(ids[i]) for i, _ in mine]
        assert seqs == list(range(last - len(mine) + 1, last + 1))
        prevs = [0, *seqs[:-1]]
        assert history(db, ch, 8) == [
            (
                f"{seq}-0",
                {"event": item.get("event", "message"), "data": data_text(item["data"]), "prev": str(prev)},
            )
            for seq, prev, (_, item) in zip(seqs, prevs, mine, strict=True)
        ]
        assert db.hget(keys.channels_key(ch, 8), ch) == str(seqs[-1]).encode()
        # The channel's events are in its partition only.
        assert [k.decode() for k in db.scan_iter(match=f"herald:*:stream:{ch}")] == [keys.stream_key(ch, 8)]
        for seq, (_, item) in zip(seqs, mine, strict=True):
            event = item.get("event", "message")
            expected_live.append((keys.live_key(ch, 8), f"{epoch} {seq} {event} {data_text(item['data'])}"))
        # The partition's idempotency record holds the seqs of its own events.
        record = idempotency_record(db, keys.partition(ch, 8), key["Idempotency-Key"])
        assert (record["epoch"], record["seqs"]) == (epoch, ",".join(map(str, seqs)))
    # SPUBLISH on each event's partition, partition after partition.
    assert live == expected_live
    assert len({epoch_of(i) for i in ids}) == 3  # an epoch per partition

    # The same request again: the same ids, nothing stored twice.
    lengths = {ch: db.xlen(keys.stream_key(ch, 8)) for ch in (a, b, c)}
    again = post_events(pub.url, batch, headers=key)
    assert again.status_code == 202, again.text
    assert again.json() == answer.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert {ch: db.xlen(keys.stream_key(ch, 8)) for ch in (a, b, c)} == lengths

    # A single event takes the next number of its own partition only.
    single = post_events(pub.url, {"channel": c, "data": "four"})
    assert single.status_code == 202, single.text
    assert single.json()["id"] == f"{epoch_of(ids[3])}-{seq_of(ids[3]) + 1}"
    assert db.hget(keys.meta_key(a, 8), "seq") == str(seq_of(ids[2])).encode()


def test_a_publisher_configured_with_another_partition_count_is_refused(
    start: Callable[..., Service], own_redis: str, channel: str
) -> None:
    url = f"{own_redis}/1"
    db = redis.Redis.from_url(url)
    one = start("publisher", redis_url_override=url)  # PARTITIONS=1, the default
    assert post_events(one.url, {"channel": channel, "data": 1}).status_code == 202
    assert db.hget(keys.meta_key(channel), "partitions") == b"1"

    two = start("publisher", redis_url_override=url, PARTITIONS="2", RETRY_AFTER_SECONDS="3")
    in_p0, in_p1 = sorted(
        keys.channels_in_distinct_partitions(channel, 2, 2), key=lambda ch: keys.partition(ch, 2)
    )
    for body in (
        {"channel": in_p1, "data": 2},
        [{"channel": in_p0, "data": 3}, {"channel": in_p1, "data": 4}],
    ):
        answer = post_events(two.url, body)
        message = assert_error(answer, 503, "misconfigured")["message"]
        assert "PARTITIONS=1" in message and "PARTITIONS=2" in message, message
        assert answer.headers["Retry-After"] == "3"
    # Nothing was written with the wrong count, not even in a partition the data never used.
    assert list(db.scan_iter(match="herald:{p1}:*")) == []
    assert db.xlen(keys.stream_key(in_p0, 2)) == 0
    assert eventually(lambda: "misconfigured" in two.log(), timeout=5), two.log()
    assert "Traceback" not in two.log()
    # The publisher with the right count is unaffected.
    assert post_events(one.url, {"channel": in_p1, "data": 5}).status_code == 202


def test_the_publish_script_refuses_a_partition_written_with_another_count(
    start: Callable[..., Service], own_redis: str, channel: str
) -> None:
    url = f"{own_redis}/3"
    db = redis.Redis.from_url(url)
    pub = start("publisher", redis_url_override=url, PARTITIONS="2")
    a, b = keys.channels_in_distinct_partitions(channel, 2, 2)
    assert post_events(pub.url, {"channel": a, "data": 1}).status_code == 202
    # Later, b's partition turns out to be written with another count (another publisher):
    # the script itself refuses it (HERALD_PARTITIONS), before writing anything.
    db.hset(keys.meta_key(b, 2), "partitions", "3")
    seq_a = db.hget(keys.meta_key(a, 2), "seq")
    for body in ({"channel": b, "data": 2}, [{"channel": b, "data": 3}, {"channel": a, "data": 4}]):
        message = assert_error(post_events(pub.url, body), 503, "misconfigured")["message"]
        assert "PARTITIONS=3" in message and "PARTITIONS=2" in message, message
    assert db.xlen(keys.stream_key(b, 2)) == 0
    assert db.hget(keys.meta_key(b, 2), "seq") is None
    assert db.hget(keys.meta_key(a, 2), "seq") == seq_a
    assert "Traceback" not in pub.log()


def test_a_batch_failing_in_its_second_partition_is_partially_stored_and_a_retry_completes_it(
    start: Callable[..., Service], own_redis: str, channel: str
) -> None:
    url = f"{own_redis}/2"
    db = redis.Redis.from_url(url)
    pub = start("publisher", redis_url_override=url, PARTITIONS="8")
    a, b, c, d = keys.channels_in_distinct_partitions(channel, 4, 8)
    # A real failure of b's partition: its meta is not a hash (WRONGTYPE in the script).
    db.set(keys.meta_key(b, 8), "not a hash")
    batch = [
        {"channel": a, "data": 0},
        {"channel": b, "data": 1},
        {"channel": a, "data": 2},
        {"channel": c, "data": 3},
    ]
    key = {"Idempotency-Key": uuid.uuid4().hex}
    answer = post_events(pub.url, batch, headers=key)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Retry-After"] == "2"
    body = answer.json()
    assert set(body) == {"error", "message", "events"} and body["error"] == "partially_stored", body
    partial = body["events"]
    assert partial[1] is None and partial[3] is None
    assert [partial[0]["channel"], partial[2]["channel"]] == [a, a]
    # Exactly what the answer names is stored; the rest is not.
    assert [entry_id for entry_id, _ in history(db, a, 8)] == [
        f"{seq_of(partial[i]['id'])}-0" for i in (0, 2)
    ]
    assert history(db, b, 8) == [] and history(db, c, 8) == []
    assert not db.exists(keys.meta_key(c, 8))  # c's partition was never reached
    # An event of the broken partition alone: a 503 like any Redis failure, not a 500.
    assert_error(post_events(pub.url, {"channel": b, "data": 9}), 503, "redis_unavailable")

    # Repaired, the same request with the same key stores the rest, exactly once.
    db.delete(keys.meta_key(b, 8))
    retry = post_events(pub.url, batch, headers=key)
    assert retry.status_code == 202, retry.text
    assert "Idempotent-Replayed" not in retry.headers  # b's and c's events were stored just now
    done = retry.json()["events"]
    assert [e["channel"] for e in done] == [a, b, a, c]
    assert (done[0], done[2]) == (partial[0], partial[2])
    for ch in (a, b, c):
        answered = [f"{seq_of(e['id'])}-0" for e in done if e["channel"] == ch]
        assert [entry_id for entry_id, _ in history(db, ch, 8)] == answered
    again = post_events(pub.url, batch, headers=key)
    assert again.status_code == 202 and again.json() == retry.json()
    assert again.headers["Idempotent-Replayed"] == "true"

    # The key with another request: 422 before anything is stored, even in a
    # partition that has no record of the key.
    other = [{"channel": d, "data": 0}, {"channel": a, "data": 0}]
    assert_error(post_events(pub.url, other, headers=key), 422, "idempotency_key_reused")
    assert history(db, d, 8) == []
    assert len(history(db, a, 8)) == 2
    assert "Traceback" not in pub.log() and "unexpected error" not in pub.log()


# -- other paths and methods ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/publish/extra", 404, "not_found"),
        ("POST", "/", 404, "not_found"),
        ("GET", "/publish", 405, "method_not_allowed"),
        ("PUT", "/publish", 405, "method_not_allowed"),
        ("DELETE", "/publish", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_and_methods_get_json_errors(
    publisher: Service, method: str, path: str, status: int, code: str
) -> None:
    answer = requests.request(method, publisher.url + path, headers=CLOSE, timeout=5)
    assert_error(answer, status, code)


def test_405_lists_the_allowed_methods(publisher: Service) -> None:
    answer = requests.get(f"{publisher.url}/publish", headers=CLOSE, timeout=5)
    assert answer.status_code == 405
    assert "POST" in answer.headers.get("Allow", "")


# -- never a 500 ----------------------------------------------------------------------

FUZZ_CHANNEL = f"t.fuzz-{uuid.uuid4().hex[:8]}"
_names = st.sampled_from([FUZZ_CHANNEL, "", "a b", "é", "x" * 130, "\x00"])
_fields = st.dictionaries(
    st.sampled_from(["channel", "event", "data", "id", "Data"]),
    _names | st.integers() | st.none() | st.lists(st.integers(), max_size=2),
    max_size=4,
)
_documents = _fields | st.lists(_fields | st.integers() | st.none(), max_size=4)
_bodies = st.one_of(
    _documents.map(lambda d: json.dumps(d).encode()),
    _documents.map(lambda d: json.dumps(d)[: max(0, len(json.dumps(d)) - 3)].encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
_content_types = st.sampled_from(
    [
        "application/json",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "text/plain",
        "",
        "application/x-www-form-urlencoded; charset=utf-8",
    ]
)
_authorizations = st.sampled_from(["", "Bearer x", "Basic Zm9vOmJhcg==", "Bearer  ", "bearer é"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, content_type=_content_types, authorization=_authorizations)
def test_no_request_body_causes_a_500(
    publisher: Service, body: bytes, content_type: str, authorization: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    if authorization:
        headers["Authorization"] = authorization
    answer = post_raw(
        publisher.url, body, {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    )
    assert answer.status_code in (202, 400, 413, 415), (answer.status_code, answer.text)
    if answer.status_code != 202:
        assert_error(answer, answer.status_code)


def test_keep_alive_connections_get_one_write_per_answer_and_do_not_hold_up_a_stop(
    start: Callable[..., Service], channel: str
) -> None:
    pub = start("publisher", GRACEFUL_TIMEOUT="10")
    body = json.dumps({"channel": channel, "data": 1}).encode()
    request = (
        b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    idle = []
    for _ in range(5):
        conn = socket.create_connection(("127.0.0.1", pub.port), timeout=15)
        conn.sendall(request)
        answer = conn.recv(65536)  # header block and body arrive in one segment
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b" 202 " in head.split(b"\r\n")[0] and b"Connection: keep-alive" in head
        assert json.loads(payload)["channel"] == channel
        idle.append(conn)
    started = time.monotonic()
    pub.stop()
    # gunicorn would wait on each idle connection until GRACEFUL_TIMEOUT, then kill.
    assert time.monotonic() - started < 5
    assert pub.process.returncode == 0
    for conn in idle:
        assert conn.recv(1) == b""  # closed by the server, cleanly
        conn.close()
    assert "Traceback" not in pub.log() and "graceful timeout" not in pub.log()


def test_the_publisher_log_has_no_unexpected_errors(publisher: Service) -> None:
    log = publisher.log()
    assert "unexpected error" not in log
    assert "Traceback" not in log
