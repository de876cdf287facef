"""Both sides of the Redis contract (docs/redis-contract.md), against a real Redis.

(a) The publisher's writes are read back with plain Redis commands.
(b) The stream service is fed with events written by plain Redis commands, as
    the contract describes them, without any of the publisher's code.

These tests share the session's Redis with every other test: they never flush
it, and they use the epoch already in `herald:meta`.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.client import Pipeline

from tests.conftest import post_events
from tests.support.services import Service
from tests.support.sse_client import SSEClient, open_stream

META = "herald:meta"
CHANNELS = "herald:channels"
EPOCH_RE = re.compile(r"[0-9a-f]{12}")


def stream_key(channel: str) -> str:
    return f"herald:stream:{channel}"


def live_key(channel: str) -> str:
    return f"herald:live:{channel}"


def entries(client: redis.Redis, channel: str) -> list[tuple[int, dict[str, str]]]:
    """XRANGE of the channel's stream: [(seq, fields)], checking every id is `<seq>-0`."""
    out = []
    raw: Any = client.xrange(stream_key(channel))
    for entry_id, fields in raw:
        seq, _, zero = entry_id.decode().partition("-")
        assert zero == "0", entry_id
        out.append((int(seq), {k.decode(): v.decode() for k, v in fields.items()}))
    return out


def meta(client: redis.Redis) -> tuple[str, int]:
    raw: Any = client.hmget(META, "epoch", "seq")
    epoch, seq = raw
    assert epoch is not None
    return epoch.decode(), int(seq or 0)


def split_id(event_id: str) -> tuple[str, int]:
    epoch, _, seq = event_id.partition("-")
    assert EPOCH_RE.fullmatch(epoch), event_id
    return epoch, int(seq)


def publish(base: str, body: Any) -> Any:
    answer = post_events(base, body)
    assert answer.status_code == 202, answer.text
    return answer.json()


# -- (a) the publisher's side ------------------------------------------------------------


def test_publisher_writes_meta_streams_and_channel_heads(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    ids: list[tuple[str, str, str, Any]] = []  # (id, channel, event, data) in publish order
    for i in range(3):
        answer = publish(publisher.url, {"channel": a, "event": "tick", "data": {"i": i}})
        ids.append((answer["id"], a, "tick", {"i": i}))
    batch: list[dict[str, Any]] = [{"channel": b if i % 2 else a, "data": [i, "x y"]} for i in range(4)]
    for item, answer in zip(batch, publish(publisher.url, batch)["events"], strict=True):
        ids.append((answer["id"], item["channel"], "message", item["data"]))
    ids.append((publish(publisher.url, {"channel": b, "data": None})["id"], b, "message", None))

    epoch, seq = meta(redis_client)
    assert EPOCH_RE.fullmatch(epoch)
    seqs = []
    for event_id, *_ in ids:
        id_epoch, id_seq = split_id(event_id)
        assert id_epoch == epoch
        seqs.append(id_seq)
    # One counter for all channels: strictly increasing in publish order, across channels.
    assert all(x < y for x, y in itertools.pairwise(seqs))
    assert seq == seqs[-1]  # herald:meta seq is the last number given out

    for name in (a, b):
        mine = [(s, e, d) for s, (_, c, e, d) in zip(seqs, ids, strict=True) if c == name]
        stored = entries(redis_client, name)
        assert [s for s, _ in stored] == [s for s, _, _ in mine]
        prev = 0
        for (entry_seq, fields), (_, event, data) in zip(stored, mine, strict=True):
            assert set(fields) == {"event", "data", "prev"}
            assert fields["event"] == event
            assert fields["data"] == json.dumps(data, separators=(",", ":"))
            assert int(fields["prev"]) == prev  # the channel's previous event, 0 for its first
            prev = entry_seq
        # herald:channels holds each channel's newest seq.
        assert redis_client.hget(CHANNELS, name) == str(prev).encode()
        # The default HISTORY_TTL_SECONDS (7 days) is set on the stream at each publish.
        assert 0 < redis_client.ttl(stream_key(name)) <= 604800


def test_live_message_is_epoch_seq_event_data(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(live_key(a), live_key(b))
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message and message["type"] == "subscribe":
                confirmed += 1
        assert confirmed == 2, "the subscriptions were not confirmed"

        sent: list[dict[str, Any]] = [
            {"channel": a, "event": "chat.message", "data": {"text": "hello there, world", "n": 1}},
            {"channel": b, "data": "two words"},
            {"channel": a, "event": "x:y-z_w", "data": ["é ✓", {"k": " v "}]},
        ]
        ids = [publish(publisher.url, body)["id"] for body in sent[:1]]
        ids += [e["id"] for e in publish(publisher.url, sent[1:])["events"]]

        received: list[tuple[str, str]] = []
        deadline = time.monotonic() + 10
        while len(received) < len(sent) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message and message["type"] == "message":
                received.append((message["channel"].decode(), message["data"].decode("utf-8")))
        assert len(received) == len(sent), received
    finally:
        pubsub.close()

    epoch, _ = meta(redis_client)
    for body, event_id, (live, text) in zip(sent, ids, received, strict=True):
        _, seq = split_id(event_id)
        data = json.dumps(body["data"], separators=(",", ":"), ensure_ascii=False)
        assert live == live_key(body["channel"])
        assert text == f"{epoch} {seq} {body.get('event', 'message')} {data}"
        # The data (last field) may contain spaces; split at the first three only.
        assert text.split(" ", 3)[3] == data
        # And it is the same JSON text as in the stream entry.
        stored = dict(entries(redis_client, body["channel"]))
        assert stored[seq]["data"] == data


def test_history_maxlen_trims_approximately(
    start: Callable[..., Service], redis_client: redis.Redis, channel: str
) -> None:
    service = start("publisher", HISTORY_MAXLEN="10", HISTORY_TTL_SECONDS="0")
    seqs: list[int] = []
    first_seen_after_two_batches = 0
    for batch in range(5):
        answer = publish(service.url, [{"channel": channel, "data": batch * 100 + i} for i in range(100)])
        seqs += [split_id(e["id"])[1] for e in answer["events"]]
        length = redis_client.xlen(stream_key(channel))
        # `MAXLEN ~ 10`: at least 10 entries, at most one macro node (100) more.
        assert 10 <= length <= 110, (batch, length)
        if batch == 1:
            first_seen_after_two_batches = entries(redis_client, channel)[0][0]
    stored = entries(redis_client, channel)
    assert 10 <= len(stored) <= 110
    # Only the oldest entries go: what is left is the newest, unbroken (one script per batch).
    assert [s for s, _ in stored] == seqs[-len(stored) :]
    assert stored[-1][1]["data"] == "499"
    # Trimming advanced: the oldest entry left is newer than it was after two batches.
    assert stored[0][0] > first_seen_after_two_batches > seqs[0]
    # The first entry left names a predecessor that trimming removed: a gap is detectable.
    first_seq, first_fields = stored[0]
    assert int(first_fields["prev"]) == seqs[seqs.index(first_seq) - 1]
    assert int(first_fields["prev"]) not in {s for s, _ in stored}
    assert redis_client.hget(CHANNELS, channel) == str(seqs[-1]).encode()
    # HISTORY_TTL_SECONDS=0: the stream never expires.
    assert redis_client.ttl(stream_key(channel)) == -1


# -- (b) the stream service's side -------------------------------------------------------


def contract_publish(
    client: redis.Redis, channel: str, event: str, data: str, maxlen: int = 1000
) -> tuple[str, int]:
    """Publish one event with plain Redis commands, as docs/redis-contract.md says.

    MULTI/EXEC instead of the publisher's Lua script: WATCH the two hashes, read
    the epoch, the next seq and the channel's previous seq, then queue HINCRBY,
    HSET, XADD and PUBLISH; if anything changed in between, EXEC fails and we retry.
    """
    client.hsetnx(META, "epoch", secrets.token_hex(6))
    result: dict[str, Any] = {}

    def write(pipe: Pipeline) -> None:
        current: Any = pipe.hmget(META, "epoch", "seq")
        epoch_b, seq_b = current
        prev = int(pipe.hget(CHANNELS, channel) or 0)
        epoch, seq = epoch_b.decode(), int(seq_b or 0) + 1
        pipe.multi()
        pipe.hsetnx(META, "epoch", epoch)
        pipe.hincrby(META, "seq", 1)
        pipe.hset(CHANNELS, channel, seq)
        pipe.execute_command(
            "XADD", stream_key(channel), "MAXLEN", "~", maxlen, f"{seq}-0",
            "event", event, "data", data, "prev", prev,
        )  # fmt: skip
        pipe.execute_command("PUBLISH", live_key(channel), f"{epoch} {seq} {event} {data}")
        result.update(epoch=epoch, seq=seq)

    replies: Any = client.transaction(write, META, CHANNELS)
    assert replies[1] == result["seq"], replies  # HINCRBY agreed with what we wrote
    return result["epoch"], result["seq"]


def current_id(client: redis.Redis) -> str:
    epoch, seq = meta(client)
    return f"{epoch}-{seq}"


def events_of(client: SSEClient) -> list[tuple[str, str, str]]:
    return [(e.id, e.event, e.data) for e in client.events]


def test_stream_delivers_events_written_with_plain_redis_commands(
    stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    client = open_stream(stream.url, [a, b])
    try:
        assert client.status == 200
        written = [
            (a, "note", '{"text":"with spaces, and more"}'),
            (b, "user.joined:x-y_z", '"é ✓ 🚀"'),
            (a, "message", "[1,2,3]"),
            (b, "tick", "null"),
        ]
        expected = []
        for target, event, data in written:
            epoch, seq = contract_publish(redis_client, target, event, data)
            expected.append((f"{epoch}-{seq}", event, data))
        client.wait_events(len(written))
        assert events_of(client) == expected
        assert client.last_id == expected[-1][0]
    finally:
        client.close()


def test_stream_replays_plain_redis_events_on_resume(
    stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    before = current_id(redis_client)
    written = []
    for i, target in enumerate([a, b, a]):
        epoch, seq = contract_publish(redis_client, target, "past", json.dumps({"i": i, "s": "a b"}))
        written.append((f"{epoch}-{seq}", "past", json.dumps({"i": i, "s": "a b"})))

    # Everything since `before` comes from history (it was written before the stream opened).
    client = open_stream(stream.url, [a, b], last_event_id=before)
    try:
        client.wait_events(3)
        assert events_of(client) == written
        # Then the stream is live: a new event follows the replay.
        epoch, seq = contract_publish(redis_client, b, "now", '"live"')
        client.wait_events(4)
        assert events_of(client)[3] == (f"{epoch}-{seq}", "now", '"live"')
    finally:
        client.close()

    # A resume from the first event (Last-Event-ID header, as a browser reconnects) gets the rest.
    again = open_stream(stream.url, [a, b], header_id=written[0][0])
    try:
        again.wait_events(3)
        assert events_of(again)[:2] == written[1:]
        assert events_of(again)[2][1:] == ("now", '"live"')
    finally:
        again.close()


def wait_reset(client: SSEClient) -> tuple[str, dict[str, Any]]:
    (event,) = client.wait_events(1)
    assert event.event == "reset", event
    return event.id, event.json()


@pytest.mark.parametrize("reason", ["epoch_changed", "unknown_id"])
def test_resume_from_an_id_redis_does_not_know_is_a_reset(
    stream: Service, redis_client: redis.Redis, channel: str, reason: str
) -> None:
    contract_publish(redis_client, channel, "e", "1")
    epoch, seq = meta(redis_client)
    if reason == "epoch_changed":
        other = ("0" if epoch[0] != "0" else "1") + epoch[1:]
        last = f"{other}-{seq}"
    else:
        last = f"{epoch}-{seq + 1000}"
    client = open_stream(stream.url, [channel], last_event_id=last)
    try:
        reset_id, data = wait_reset(client)
        assert data == {"reason": reason}
        # The reset carries the current position, from which the client continues.
        assert split_id(reset_id) == (epoch, seq)
        new_epoch, new_seq = contract_publish(redis_client, channel, "after", '"x"')
        client.wait_events(2)
        assert events_of(client)[1] == (f"{new_epoch}-{new_seq}", "after", '"x"')
    finally:
        client.close()


@pytest.mark.parametrize("how", ["trimmed", "expired"])
def test_resume_across_lost_history_is_a_reset(
    stream: Service, redis_client: redis.Redis, channel: str, how: str
) -> None:
    before = current_id(redis_client)
    seqs = [contract_publish(redis_client, channel, "e", str(i))[1] for i in range(3)]
    if how == "trimmed":
        assert redis_client.xtrim(stream_key(channel), maxlen=1, approximate=False) == 2
    else:
        assert redis_client.delete(stream_key(channel)) == 1  # as if the idle TTL ran out
    client = open_stream(stream.url, [channel], last_event_id=before)
    try:
        reset_id, data = wait_reset(client)
        assert data == {"reason": "history_trimmed"}
        assert split_id(reset_id)[1] >= seqs[-1]
    finally:
        client.close()

    # From an id after the lost events, nothing is missing: no reset, just what is left.
    after_lost = seqs[1] if how == "trimmed" else seqs[2]
    later = open_stream(stream.url, [channel], last_event_id=f"{split_id(before)[0]}-{after_lost}")
    try:
        if how == "trimmed":
            later.wait_events(1)
            assert events_of(later)[0][1:] == ("e", "2")
        epoch, seq = contract_publish(redis_client, channel, "fresh", "3")
        later.wait_for(lambda: any(e.event == "fresh" for e in later.events))
        assert [e.event for e in later.events] == (["e"] if how == "trimmed" else []) + ["fresh"]
        assert later.events[-1].id == f"{epoch}-{seq}"
    finally:
        later.close()


def test_resume_with_trimming_before_the_id_is_not_a_reset(
    stream: Service, redis_client: redis.Redis, channel: str
) -> None:
    quiet, busy = channel + ".quiet", channel + ".busy"
    contract_publish(redis_client, quiet, "old", "0")
    for i in range(5):
        contract_publish(redis_client, busy, "e", str(i))
    # Trimming removes only events the client has already seen.
    assert redis_client.xtrim(stream_key(busy), maxlen=1, approximate=False) == 4
    last = current_id(redis_client)
    epoch, seq = contract_publish(redis_client, busy, "e", "5")
    client = open_stream(stream.url, [quiet, busy], last_event_id=last)
    try:
        client.wait_events(1)
        new_epoch, new_seq = contract_publish(redis_client, quiet, "new", "1")
        client.wait_events(2)
        assert events_of(client) == [(f"{epoch}-{seq}", "e", "5"), (f"{new_epoch}-{new_seq}", "new", "1")]
    finally:
        client.close()
