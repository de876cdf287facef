"""Gapless resume with Last-Event-ID / lastEventId, and the reset signal."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from tests.conftest import post_events
from tests.integration.conftest import Deployment
from tests.support import keys
from tests.support.services import Service
from tests.support.sse_client import open_stream


def test_resume_from_header_replays_exactly_the_missed_events(deployment: Deployment, channel: str) -> None:
    first = open_stream(deployment.stream.url, [channel])
    ids = [deployment.publish(channel, i) for i in range(5)]
    assert [e.id for e in first.wait_events(5)] == ids
    first.close()
    missed = [deployment.publish(channel, i) for i in range(5, 10)]
    again = open_stream(deployment.stream.url, [channel], header_id=ids[-1])
    try:
        assert [e.id for e in again.wait_events(5)] == missed
        live = deployment.publish(channel, 10)
        assert [e.id for e in again.wait_events(6)] == [*missed, live]
        assert [e.json() for e in again.events] == list(range(5, 11))
    finally:
        again.close()


def test_resume_from_query_parameter(deployment: Deployment, channel: str) -> None:
    ids = [deployment.publish(channel, i) for i in range(6)]
    client = open_stream(deployment.stream.url, [channel], last_event_id=ids[2])
    try:
        assert [e.id for e in client.wait_events(3)] == ids[3:]
    finally:
        client.close()


def test_header_wins_over_the_query_parameter(deployment: Deployment, channel: str) -> None:
    # A browser reconnects to the same URL (with the first lastEventId in it) and
    # sends the newer Last-Event-ID header: the header must decide.
    ids = [deployment.publish(channel, i) for i in range(6)]
    client = open_stream(deployment.stream.url, [channel], last_event_id=ids[0], header_id=ids[3])
    try:
        assert [e.id for e in client.wait_events(2)] == ids[4:]
        assert not client.wait_for(lambda: len(client.events) > 2, timeout=0.5)
    finally:
        client.close()


def test_resume_across_channels_is_merged_in_publish_order(deployment: Deployment, channel: str) -> None:
    # In one partition: one sequence orders them (across partitions no order is defined).
    a, b, c = deployment.same_partition(channel, 3)
    sent = [(ch, deployment.publish(ch, i)) for i, ch in enumerate([a, b, c] * 10)]
    start = sent[4][1]
    client = open_stream(deployment.stream.url, [a, b], last_event_id=start)
    try:
        expected = [i for ch, i in sent[5:] if ch != c]
        got = client.wait_events(len(expected))
        assert [e.id for e in got] == expected
        assert [e.seq for e in got] == sorted(e.seq for e in got)
    finally:
        client.close()


def test_fresh_stream_gets_a_position_so_reconnect_is_gapless(deployment: Deployment, channel: str) -> None:
    first = open_stream(deployment.stream.url, [channel])
    assert first.wait_for(lambda: first.last_id != "")
    position = first.last_id
    first.close()
    # Published while the client was away, before it ever saw an event.
    missed = [deployment.publish(channel, i) for i in range(3)]
    again = open_stream(deployment.stream.url, [channel], header_id=position)
    try:
        assert [e.id for e in again.wait_events(3)] == missed
    finally:
        again.close()


def test_trimmed_history_sends_reset_then_live_events(
    start: Callable[..., Service], stream: Service, channel: str
) -> None:
    short = start("publisher", HISTORY_MAXLEN="10")
    first = post_events(short.url, {"channel": channel, "data": "first"}).json()["id"]
    batch = [{"channel": channel, "data": i} for i in range(100)]
    for _ in range(3):
        answer = post_events(short.url, batch)
        assert answer.status_code == 202
    newest = answer.json()["events"][-1]["id"]
    client = open_stream(stream.url, [channel], last_event_id=first)
    try:
        (reset,) = client.wait_events(1)
        assert reset.event == "reset"
        assert json.loads(reset.data) == {"reason": "history_trimmed"}
        # The reset carries the position the client continues from: the newest event.
        assert reset.id == newest
        live = post_events(short.url, {"channel": channel, "data": "live"}).json()["id"]
        events = client.wait_events(2)
        assert [(e.id, e.data) for e in events[1:]] == [(live, '"live"')]
    finally:
        client.close()


def test_unknown_future_id_sends_reset(deployment: Deployment, channel: str) -> None:
    epoch, seq = deployment.publish(channel, 1).split("-")
    client = open_stream(deployment.stream.url, [channel], last_event_id=f"{epoch}-{int(seq) + 10**9}")
    try:
        (reset,) = client.wait_events(1)
        assert reset.event == "reset" and json.loads(reset.data) == {"reason": "unknown_id"}
    finally:
        client.close()


def test_flushed_redis_sends_reset_to_resuming_and_connected_clients(
    start: Callable[..., Service], redis_url: str, channel: str
) -> None:
    # Its own database, so that the flush touches no other test's data.
    url = redis_url.rsplit("/", 1)[0] + "/5"
    db = redis.Redis.from_url(url)
    db.flushdb()
    pub = start("publisher", redis_url_override=url)
    sse = start("stream", redis_url_override=url)
    old = post_events(pub.url, {"channel": channel, "data": "before"}).json()["id"]
    connected = open_stream(sse.url, [channel])
    db.flushdb()  # Redis loses its data: the next publish starts a new epoch
    new = post_events(pub.url, {"channel": channel, "data": "after"}).json()["id"]
    assert new.split("-")[0] != old.split("-")[0]
    resuming = open_stream(sse.url, [channel], last_event_id=old)
    try:
        reset, after = connected.wait_events(2)
        assert reset.event == "reset" and json.loads(reset.data) == {"reason": "epoch_changed"}
        assert after.id == new and after.data == '"after"'
        (reset2,) = resuming.wait_events(1)
        assert reset2.event == "reset" and json.loads(reset2.data) == {"reason": "epoch_changed"}
        assert reset2.id.split("-")[0] == new.split("-")[0]
        newer = post_events(pub.url, {"channel": channel, "data": "newer"}).json()["id"]
        assert resuming.wait_events(2)[1].id == newer
        # The client that saw the reset id resumes gaplessly from it.
        assert connected.wait_events(3)[2].id == newer
    finally:
        connected.close()
        resuming.close()
        db.close()


def test_a_replay_larger_than_the_client_buffer_arrives_whole(
    start: Callable[..., Service], publisher: Service, channel: str
) -> None:
    # The catch-up is written out however long it is; only live events that
    # pile up behind a client that does not read count against the buffer.
    service = start("stream", CLIENT_BUFFER_BYTES="16384")
    first = open_stream(service.url, [channel])
    head = first.last_id
    first.close()
    ids = []
    for batch in range(14):  # 210 events of ~60 KB: more than loopback's socket buffers take at once
        body = [{"channel": channel, "data": {"n": batch * 15 + i, "pad": "x" * 60_000}} for i in range(15)]
        answer = post_events(publisher.url, body)
        assert answer.status_code == 202, answer.text
        ids += [event["id"] for event in answer.json()["events"]]
    client = open_stream(service.url, [channel], header_id=head)
    try:
        got = client.wait_events(len(ids), timeout=30)  # ~12 MB of history, 750 times the buffer
        assert [e.id for e in got] == ids
        assert client.ended is None
    finally:
        client.close()


def test_writes_lost_in_a_failover_start_a_new_epoch_so_no_id_repeats(
    start: Callable[..., Service], redis_url: str, channel: str
) -> None:
    # What a failover to a replica that lagged looks like to the services: the
    # same epoch, but the last events and the counter behind what was delivered.
    url = redis_url.rsplit("/", 1)[0] + "/6"
    db = redis.Redis.from_url(url)
    db.flushdb()
    pub = start("publisher", redis_url_override=url)
    sse = start("stream", redis_url_override=url)
    client = open_stream(sse.url, [channel])
    try:
        ids = [post_events(pub.url, {"channel": channel, "data": i}).json()["id"] for i in range(5)]
        assert [e.id for e in client.wait_events(5)] == ids
        epoch = ids[0].split("-")[0]
        db.hset(keys.meta_key(channel), "seq", 3)  # events 4 and 5 are gone...
        db.xdel(keys.stream_key(channel), "4-0", "5-0")
        db.execute_command("XSETID", keys.stream_key(channel), "3-0")  # as on the replica
        db.hset(keys.channels_key(channel), channel, 3)
        db.client_kill_filter(_type="pubsub")  # ...and the stream worker reconnects
        reset = client.wait_events(6)[5]
        assert reset.event == "reset" and json.loads(reset.data) == {"reason": "epoch_changed"}
        new_epoch = reset.id.split("-")[0]
        assert new_epoch != epoch and db.hget(keys.meta_key(channel), "epoch") == new_epoch.encode()
        answer = post_events(pub.url, {"channel": channel, "data": "after"})
        assert answer.status_code == 202, answer.text
        after = answer.json()["id"]
        assert after.split("-")[0] == new_epoch and after not in ids  # seq 4 again, but a new id
        assert client.wait_events(7)[6].id == after
    finally:
        client.close()
        db.close()
