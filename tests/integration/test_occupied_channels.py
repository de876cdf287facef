"""`GET /channels?occupied=true` on both deployments (one Redis server; a Redis
Cluster with 16 partitions): the channels the stream service keeps in the
occupancy index while webhooks are on, with their live subscribers, a page at a
time. Real streams are opened on a stream service with WEBHOOKS=true, and the
publisher (WEBHOOKS=true, a publish token) lists them; every page is checked
against the streams, each channel comes exactly once over the pages, bad
parameters get a 400 each, the access rules are those of `GET /channels/<x>`,
and with webhooks off the route answers 404 `occupancy_off`.

The session's Redis is shared with other tests, whose channels may be in the
index too: the tests look at their own channels (a fresh prefix) in full
listings, and check the listing's order and uniqueness over every channel.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from dispatcher import occupancy as dispatcher_occupancy
from hypothesis import given
from hypothesis import strategies as st
from publisher import contract as publisher_contract
from publisher.occupied_request import decode_cursor, encode_cursor
from stream import occupancy as stream_occupancy

from tests.integration.conftest import Deployment
from tests.support import keys
from tests.support.services import Service, eventually, free_port, start_service
from tests.support.sse_client import SSEClient, open_stream

TOKEN = "occupancy-token"
CLOSE = {"Connection": "close"}


@dataclass
class Herald:
    """A stream service and a publisher with webhooks on, on one deployment."""

    deployment: Deployment
    stream: Service
    publisher: Service


@pytest.fixture(scope="module")
def herald(deployment: Deployment, logs_dir: Path) -> Iterator[Herald]:
    # A long vacated delay: a channel whose streams left stays in the index
    # (vacating) for the whole module, whatever sweeps the Redis.
    url, mode, partitions = (
        deployment.redis_url,
        deployment.env.get("REDIS_MODE", ""),
        str(deployment.partitions),
    )
    stream = start_service(
        "stream",
        url,
        logs_dir,
        REDIS_MODE=mode,
        PARTITIONS=partitions,
        WEBHOOKS="true",
        WEBHOOK_VACATED_DELAY_SECONDS="120",
    )
    try:
        publisher = start_service(
            "publisher",
            url,
            logs_dir,
            REDIS_MODE=mode,
            PARTITIONS=partitions,
            WEBHOOKS="true",
            PUBLISH_TOKEN=TOKEN,
        )
    except BaseException:
        stream.stop()
        raise
    try:
        yield Herald(deployment, stream, publisher)
    finally:
        publisher.stop()
        stream.stop()


def fresh(prefix: str) -> str:
    return f"occ.{prefix}.{uuid.uuid4().hex[:10]}"


def get(service: Service, query: str, token: str | None = TOKEN, **headers: str) -> requests.Response:
    """`GET /channels?<query>` (query as given, not re-encoded)."""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(f"{service.url}/channels?{query}", headers={**CLOSE, **headers}, timeout=10)


def presence(service: Service, channel: str, token: str | None = TOKEN, **headers: str) -> requests.Response:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.get(f"{service.url}/channels/{channel}", headers={**CLOSE, **headers}, timeout=10)


def assert_error(answer: requests.Response, status: int, code: str) -> dict[str, Any]:
    """A JSON error in the publisher's shape: exactly {"error", "message"}."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"] == "application/json", answer.headers
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return dict(body)


def pages(publisher: Service, limit: int | None = None) -> list[list[dict[str, Any]]]:
    """Every page of the listing, following next_cursor to the end."""
    found: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    for _ in range(10_000):
        query = (
            "occupied=true" + (f"&limit={limit}" if limit else "") + (f"&cursor={cursor}" if cursor else "")
        )
        answer = get(publisher, query)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "application/json"
        body = answer.json()
        assert set(body) == {"channels", "next_cursor"}, body
        page = body["channels"]
        assert len(page) <= (limit or 100)
        for item in page:
            assert set(item) == {"channel", "subscribers"}, item
            assert isinstance(item["subscribers"], int) and item["subscribers"] >= 0, item
        found.append(page)
        cursor = body["next_cursor"]
        if cursor is None:
            return found
        # A cursor is given only with a full page, and only when something is left.
        assert len(page) == (limit or 100), body
    raise AssertionError("the listing never ended")


def listed(herald: Herald, limit: int | None = None) -> list[tuple[str, int]]:
    """The whole listing as (channel, subscribers), in the order of its pages."""
    return [
        (item["channel"], item["subscribers"]) for page in pages(herald.publisher, limit) for item in page
    ]


def in_order(herald: Herald, channels: list[str], flat: list[tuple[str, int]]) -> None:
    """`channels` are each listed once, by partition then name (other tests' channels
    may be listed too, written with their own settings: only ours are checked)."""
    ours = [name for name, _ in flat if name in set(channels)]
    partitions = herald.deployment.partitions
    assert ours == sorted(set(channels), key=lambda n: (keys.partition(n, partitions), n)), ours


def counts(herald: Herald, channels: list[str], limit: int | None = None) -> dict[str, int]:
    """The subscribers listed for each of `channels` (absent: not listed)."""
    wanted = set(channels)
    return {name: n for name, n in listed(herald, limit) if name in wanted}


def close_all(clients: list[SSEClient]) -> None:
    for client in clients:
        client.close()


# -- the contract -------------------------------------------------------------------------


@pytest.mark.parametrize("partitions", [1, 16, 1024])
def test_the_index_key_is_the_contracts(partitions: int) -> None:
    """The publisher reads the index the stream service writes and the dispatcher sweeps."""
    for p in {0, partitions // 2, partitions - 1}:
        name = publisher_contract.Keys.of(p).occupancy
        assert name == keys.occupancy_key(p)
        assert name == stream_occupancy.index_key(p) == dispatcher_occupancy.index_key(p)


@given(channel=st.text("abcXYZ019_.:-", min_size=1, max_size=128))
def test_a_cursor_reads_back_as_written(channel: str) -> None:
    partitions = 1024
    partition = keys.partition(channel, partitions)  # a cursor's channel is of its partition
    cursor = encode_cursor(partition, channel)
    assert "=" not in cursor and set(cursor) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert decode_cursor(cursor, partitions) == (partition, channel)
    assert decode_cursor(encode_cursor(partition, ""), partitions) == (partition, "")


# -- listing ------------------------------------------------------------------------------


def test_streams_are_listed_with_their_subscribers_and_a_vacating_channel_with_0(herald: Herald) -> None:
    a, b, c = fresh("a"), fresh("b"), fresh("c")
    url = herald.stream.url
    on_a = [open_stream(url, [a]) for _ in range(3)]
    on_bc = [open_stream(url, [b, c]), open_stream(url, [c])]
    try:
        assert all(s.status == 200 for s in on_a + on_bc)
        expected = {a: 3, b: 1, c: 2}
        assert eventually(lambda: counts(herald, [a, b, c]) == expected, timeout=10), counts(
            herald, [a, b, c]
        )
        # Each count is presence's own (GET /channels/<channel>).
        for channel, n in expected.items():
            assert presence(herald.publisher, channel).json()["subscribers"] == n
        # a's streams leave: vacating (its channel.vacated is not due yet), listed with 0.
        close_all(on_a)
        expected = {a: 0, b: 1, c: 2}
        assert eventually(lambda: counts(herald, [a, b, c]) == expected, timeout=10), counts(
            herald, [a, b, c]
        )
    finally:
        close_all(on_a + on_bc)
    assert eventually(lambda: counts(herald, [a, b, c]) == {a: 0, b: 0, c: 0}, timeout=10)


def test_pages_of_1_to_3_list_each_channel_exactly_once(herald: Herald) -> None:
    d = herald.deployment
    prefix = fresh("page")
    if d.partitions > 1:
        # Several in one partition (pages within it) and others spread (pages across them).
        channels = keys.channels_in_one_partition(prefix + ".same", 3, d.partitions)
        channels += keys.channels_in_distinct_partitions(prefix + ".spread", 4, d.partitions)
        assert len({keys.partition(c, d.partitions) for c in channels}) > 1
    else:
        channels = [f"{prefix}.{i}" for i in range(7)]
    streams = [open_stream(herald.stream.url, [channel]) for channel in channels]
    streams += [open_stream(herald.stream.url, channels[:2])]  # the first two have 2
    expected = {channel: 2 if i < 2 else 1 for i, channel in enumerate(channels)}
    try:
        assert eventually(lambda: counts(herald, channels) == expected, timeout=10), counts(herald, channels)
        everything = listed(herald)
        in_order(herald, channels, everything)
        for limit in (1, 2, 3):
            by_pages = listed(herald, limit)
            # The pages together are the listing, each channel once, in its order.
            assert [name for name, _ in by_pages] == [name for name, _ in everything], limit
            in_order(herald, channels, by_pages)
            assert {n: s for n, s in by_pages if n in expected} == expected, limit
    finally:
        close_all(streams)


def test_lapsed_workers_do_not_count_and_a_channel_without_presence_is_0(herald: Herald) -> None:
    """The liveness rule of `GET /channels/<channel>`: a field counts until its
    deadline (Redis's clock); a channel in the index with no presence hash is 0."""
    d = herald.deployment
    live, bare = fresh("live"), fresh("bare")
    node = d.node(live)
    seconds, micros = node.time()
    now = seconds * 1000 + micros // 1000
    node.zadd(keys.occupancy_key(keys.partition(live, d.partitions)), {live: 0})
    node.hset(
        keys.presence_key(live, d.partitions),
        mapping={"dead-worker": f"5 {now - 1000}", "live-worker": f"2 {now + 60_000}", "odd": "x"},
    )
    d.node(bare).zadd(keys.occupancy_key(keys.partition(bare, d.partitions)), {bare: 0})
    try:
        assert counts(herald, [live, bare]) == {live: 2, bare: 0}
    finally:
        node.delete(keys.presence_key(live, d.partitions))
        node.zrem(keys.occupancy_key(keys.partition(live, d.partitions)), live)
        d.node(bare).zrem(keys.occupancy_key(keys.partition(bare, d.partitions)), bare)


def test_each_cursor_points_after_its_page(herald: Herald) -> None:
    """A cursor is [partition, the page's last channel] when its partition holds
    more, else [the next partition with channels, ""]; the next page starts there."""
    d = herald.deployment
    ours = [fresh("cursor") for _ in range(3)]
    for channel in ours:  # in the index, whatever else is
        d.node(channel).zadd(keys.occupancy_key(keys.partition(channel, d.partitions)), {channel: 0})
    try:
        cursor, previous, starts, seen = "", None, None, set()
        for _ in range(10_000):
            body = get(
                herald.publisher, "occupied=true&limit=1" + (f"&cursor={cursor}" if cursor else "")
            ).json()
            (item,) = body["channels"]
            here = keys.partition(item["channel"], d.partitions)
            seen.add(item["channel"])
            if previous is not None:
                assert previous < (here, item["channel"])
            if starts is not None:
                assert here == starts, 'a cursor [p, ""] starts at partition p\'s first channel'
            previous, starts = (here, item["channel"]), None
            cursor = body["next_cursor"]
            if cursor is None:
                break
            partition, channel = json.loads(base64.urlsafe_b64decode(cursor + "=="))
            if channel:
                assert (partition, channel) == (here, item["channel"]), body
            else:
                assert partition > here, body
                starts = partition
        assert cursor is None
        assert set(ours) <= seen
    finally:
        for channel in ours:
            d.node(channel).zrem(keys.occupancy_key(keys.partition(channel, d.partitions)), channel)


# -- refusals -----------------------------------------------------------------------------


def cursor_of(doc: Any, padded: bool = False) -> str:
    """A cursor made by hand: base64url of `doc` as JSON (or of the text given)."""
    text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    raw = base64.urlsafe_b64encode(text.encode()).decode()
    return raw if padded else raw.rstrip("=")


# Blank, out of range, signs, fractions, spaces, ², ٣, a full-width 5, too long, words.
BAD_LIMITS = ["", "0", "1001", "00000", "-1", "%2B5", "1.0", "1e2", "%205", "5%20", "%C2%B2", "%D9%A3"]
BAD_LIMITS += ["%EF%BC%95", "99999999999999999999", "ten"]

BAD_QUERIES = [
    ("", "invalid_occupied"),
    ("limit=5", "invalid_occupied"),
    ("occupied=false", "invalid_occupied"),
    ("occupied=TRUE", "invalid_occupied"),
    ("occupied=1", "invalid_occupied"),
    ("occupied=", "invalid_occupied"),
    ("occupied", "invalid_occupied"),
    ("occupied=true%20", "invalid_occupied"),
    ("occupied=true&occupied=true", "duplicate_parameter"),
    ("occupied=true&occ%75pied=true", "duplicate_parameter"),
    ("occupied=true&limit=1&limit=2", "duplicate_parameter"),
    ("occupied=true&cursor=a&cursor=b", "duplicate_parameter"),
    ("occupied=true&channel=x", "unknown_parameter"),
    ("occupied=true&Limit=5", "unknown_parameter"),
    ("occupied=true&=x", "unknown_parameter"),
    ("occupied=true&" + "x" * 300 + "=1", "unknown_parameter"),
    *[(f"occupied=true&limit={value}", "invalid_limit") for value in BAD_LIMITS],
    *[
        (f"occupied=true&cursor={value}", "bad_cursor")
        for value in [
            "",
            "!!!!",
            "a",  # a length base64 never has
            "a" * 300,
            "%C3%A9",
            cursor_of([0, "a"], padded=True),  # with its `=`
            "Wz%2BsIiJd",  # a `+`: standard base64, not base64url
            cursor_of("not json"),
            cursor_of("{}"),
            cursor_of([0]),
            cursor_of([0, "", 1]),
            cursor_of([-1, ""]),
            cursor_of([True, ""]),
            cursor_of('[0.0,""]'),
            cursor_of('[0, ""]'),  # not the compact spelling
            cursor_of([0, "no spaces"]),
            cursor_of([0, "x" * 129]),
            cursor_of([0, None]),
            cursor_of(["0", ""]),
            cursor_of([[0], ""]),
        ]
    ],
]


@pytest.mark.parametrize(("query", "code"), BAD_QUERIES)
def test_bad_parameters_get_a_400_each(herald: Herald, query: str, code: str) -> None:
    assert_error(get(herald.publisher, query), 400, code)


def test_cursors_outside_the_partitions_or_of_another_partition_are_refused(herald: Herald) -> None:
    d = herald.deployment
    for doc in ([d.partitions, ""], [d.partitions + 1000, ""], [2**64, ""]):
        assert_error(get(herald.publisher, f"occupied=true&cursor={cursor_of(doc)}"), 400, "bad_cursor")
    channel = "orders"
    home = keys.partition(channel, d.partitions)
    assert get(herald.publisher, f"occupied=true&cursor={cursor_of([home, channel])}").status_code == 200
    if d.partitions > 1:
        elsewhere = (home + 1) % d.partitions
        answer = get(herald.publisher, f"occupied=true&cursor={cursor_of([elsewhere, channel])}")
        assert_error(answer, 400, "bad_cursor")


def test_good_parameters_in_any_order_are_accepted(herald: Herald) -> None:
    for query in (
        "occupied=true",
        "limit=1000&occupied=true",
        "occupied=true&limit=1",
        "limit=0007&occupied=true",
        f"cursor={cursor_of([0, ''])}&occupied=true&limit=2",
    ):
        answer = get(herald.publisher, query)
        assert answer.status_code == 200, (query, answer.text)


# -- access and availability --------------------------------------------------------------


def test_the_token_is_needed_as_for_presence(herald: Herald) -> None:
    pub = herald.publisher
    for token, headers, status, code in [
        (None, {}, 401, "unauthorized"),
        ("wrong", {}, 401, "unauthorized"),
        (TOKEN, {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, 403, "cross_site"),
        (None, {"Sec-Fetch-Site": "cross-site"}, 403, "cross_site"),
    ]:
        answer = get(pub, "occupied=true", token, **headers)
        assert_error(answer, status, code)
        assert_error(presence(pub, "orders", token, **headers), status, code)
        if status == 401:
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # Who is asking comes before what is asked.
    assert_error(get(pub, "occupied=nope&limit=0", token=None), 401, "unauthorized")


def test_with_webhooks_off_the_route_answers_404_occupancy_off(herald: Herald) -> None:
    """The deployment's own publisher runs without WEBHOOKS (and without a token)."""
    off = herald.deployment.publisher
    for query in ("occupied=true", "occupied=true&limit=5", "limit=bad"):
        body = assert_error(get(off, query, token=None), 404, "occupancy_off")
        assert "WEBHOOK_URL" in body["message"], body
    # Without a token, a Host that is not loopback is refused before that, as for presence.
    remote = {"Host": "herald.example"}
    assert_error(get(off, "occupied=true", token=None, **remote), 403, "host_not_allowed")
    assert_error(presence(off, "orders", token=None, **remote), 403, "host_not_allowed")


def test_redis_unreachable_gives_503(start: Callable[..., Service]) -> None:
    pub = start(
        "publisher",
        redis_url_override=f"redis://127.0.0.1:{free_port()}/0",
        ready=False,
        WEBHOOKS="true",
        REDIS_TIMEOUT_SECONDS="0.5",
    )
    started = time.monotonic()
    answer = get(pub, "occupied=true", token=None)
    assert_error(answer, 503, "redis_unavailable")
    assert answer.headers["Retry-After"]
    assert time.monotonic() - started < 5
    # Bad parameters are still a 400: nothing was read.
    assert_error(get(pub, "occupied=true&limit=0", token=None), 400, "invalid_limit")
