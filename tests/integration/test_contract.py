"""Both sides of the Redis contract (docs/redis-contract.md), against a real Redis.

(a) The publisher's writes are read back with plain Redis commands.
(b) The stream service is fed with events written by plain Redis commands, as
    the contract describes them, without any of the publisher's code.

These tests share the session's Redis with every other test: they never flush
it, and they use the epoch already in the meta hash. The services run with the
default PARTITIONS=1, so every channel is in partition 0 (`herald:{p0}:...`);
tests/integration/test_publisher.py checks the publisher with more partitions.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from publisher import contract as publisher_contract
from redis.client import Pipeline
from stream import contract

from tests.conftest import post_events
from tests.integration.conftest import Deployment
from tests.support import keys
from tests.support.services import Service
from tests.support.sse_client import SSEClient, open_stream

# With one partition, every channel's (crc32 mod 1 = 0): partition 0.
META = keys.meta_key("")
CHANNELS = keys.channels_key("")
EXPIRIES = keys.expiries_key("")
EPOCH_RE = re.compile(r"[0-9a-f]{12}")


def stream_key(channel: str) -> str:
    return keys.stream_key(channel)


def live_key(channel: str) -> str:
    """The sharded Pub/Sub channel (SPUBLISH / SSUBSCRIBE) of the channel's events."""
    return keys.live_key(channel)


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


# Each service names its keys in one module, its contract.py; these spell them
# from the document to check both.
SERVICES = Path(__file__).resolve().parents[2]
PUBLISHER_MODULES = SERVICES / "publisher-service" / "publisher"
STREAM_MODULES = SERVICES / "stream-service" / "stream"
KEY_CHANNELS = ["", "a", "news", "chat.room-1", "private-x:y_z", "x" * 128, *(f"c.{i}" for i in range(50))]


def presence_key(channel: str, partitions: int = 1) -> str:
    """The presence hash of a channel, as the contract's key table spells it."""
    return f"{keys.tag(channel, partitions)}:presence:{channel}"


def modules_spelling_keys(folder: Path) -> list[str]:
    """The modules of `folder` whose code spells a key (docstrings and comments may cite them)."""
    spelling = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        if any(
            isinstance(node, ast.Constant) and "herald:" in str(node.value) and id(node) not in docstrings
            for node in ast.walk(tree)
        ):
            spelling.append(path.name)
    return spelling


# -- (a) the publisher's side ------------------------------------------------------------


@pytest.mark.parametrize("partitions", [1, 16, 1024])
def test_the_publisher_names_every_key_as_the_contract_does(partitions: int) -> None:
    """publisher/contract.py, the publisher's one home of key names, spells each
    key as docs/redis-contract.md does."""
    for name in KEY_CHANNELS:
        p = publisher_contract.partition_of(name, partitions)
        assert p == keys.partition(name, partitions)
        names = publisher_contract.Keys.of(p)
        assert names.meta == keys.meta_key(name, partitions)
        assert names.channels == keys.channels_key(name, partitions)
        assert names.expiries == keys.expiries_key(name, partitions)
        assert names.stream + name == keys.stream_key(name, partitions)
        assert names.live + name == keys.live_key(name, partitions)
        assert names.presence + name == presence_key(name, partitions)
        assert names.idempotency + "*" == keys.idempotency_pattern(p)


def test_no_other_publisher_module_spells_a_key() -> None:
    """Key names are made in publisher/contract.py only (docstrings and comments may cite them)."""
    spelling = modules_spelling_keys(PUBLISHER_MODULES)
    assert spelling == ["contract.py"], "Redis keys are named in publisher/contract.py only"


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
    # One counter per partition; with one partition, for all channels: strictly
    # increasing in publish order, across channels.
    assert all(x < y for x, y in itertools.pairwise(seqs))
    assert seq == seqs[-1]  # the meta hash's seq is the last number given out
    assert redis_client.hget(META, "partitions") == b"1"  # P, as the publisher is configured

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
        # The channels hash holds each channel's newest seq.
        assert redis_client.hget(CHANNELS, name) == str(prev).encode()
        # The default HISTORY_TTL_SECONDS (7 days) is set on the stream at each publish,
        # and the expiries set has when (ms, Redis's clock); a channel leaves the index
        # once that has passed (tests/integration/test_redis_memory.py, on a Redis of its own).
        assert 0 < redis_client.ttl(stream_key(name)) <= 604800
        now_ms = int(redis_client.time()[0]) * 1000
        expires = redis_client.zscore(EXPIRIES, name)
        assert expires is not None and now_ms < expires <= now_ms + 604800 * 1000 + 1000


def test_live_message_is_epoch_seq_event_data(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    a, b = channel + ".a", channel + ".b"
    pubsub = redis_client.pubsub()
    try:
        pubsub.ssubscribe(live_key(a), live_key(b))
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < 2 and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message and message["type"] == "ssubscribe":
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
            if message and message["type"] == "smessage":
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


def test_idempotency_record_is_the_partitions_part_of_the_first_answer(
    publisher: Service, redis_client: redis.Redis, channel: str
) -> None:
    key = secrets.token_hex(8)
    batch = [{"channel": channel, "data": i} for i in range(3)]
    first = post_events(publisher.url, batch, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    ids = [split_id(e["id"]) for e in first.json()["events"]]
    found = [k.decode() for k in redis_client.scan_iter(match=keys.idempotency_pattern(0), count=1000)]
    # herald:{p0}:idem:<caller>:<key>, <caller> a hash of the Authorization header.
    (record,) = [k for k in found if k.endswith(f":{key}")]
    caller = record[len("herald:{p0}:idem:") : -len(f":{key}")]
    assert re.fullmatch(r"[0-9a-f]+", caller), record
    raw: Any = redis_client.hgetall(record)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert set(fields) == {"fingerprint", "epoch", "seqs"}
    assert fields["epoch"] == ids[0][0]
    assert fields["seqs"] == ",".join(str(seq) for _, seq in ids)
    assert 0 < redis_client.ttl(record) <= 86400  # IDEMPOTENCY_WINDOW_SECONDS
    # A replay writes only the record's `replays` counter.
    again = post_events(publisher.url, batch, headers={"Idempotency-Key": key})
    assert again.status_code == 202 and again.json() == first.json()
    assert redis_client.hget(record, "replays") == b"1"
    assert len(entries(redis_client, channel)) == 3


# -- (b) the stream service's side -------------------------------------------------------
#
# On both deployments: the session's single Redis (PARTITIONS=1), and the Redis
# Cluster (PARTITIONS=16), where each event is written on the node that owns its
# partition's slot. A test's channels share a partition, so ids are plain.


@pytest.mark.parametrize("partitions", [1, 16, 1024])
def test_the_stream_service_names_every_key_as_the_contract_does(partitions: int) -> None:
    """stream/contract.py, the stream service's one home of key names, spells each
    key as docs/redis-contract.md does."""
    for name in KEY_CHANNELS:
        p = contract.partition_of(name, partitions)
        assert p == keys.partition(name, partitions)
        assert contract.meta_key(p) == keys.meta_key(name, partitions)
        assert contract.channels_key(p) == keys.channels_key(name, partitions)
        assert contract.stream_key(name, p) == keys.stream_key(name, partitions)
        assert contract.live_key(name, p) == keys.live_key(name, partitions).encode()
        assert contract.presence_key(name, p) == presence_key(name, partitions)
        assert contract.partition_in_key(contract.live_key(name, p)) == p


def test_no_other_stream_module_spells_a_key() -> None:
    """Key names are made in stream/contract.py only (docstrings and comments may cite them)."""
    spelling = modules_spelling_keys(STREAM_MODULES)
    assert spelling == ["contract.py"], "Redis keys are named in stream/contract.py only"


def names(deployment: Deployment, channel: str, count: int) -> list[str]:
    """`count` channel names that share one partition of the deployment."""
    return keys.channels_in_one_partition(channel, count, deployment.partitions)


def contract_publish(
    d: Deployment, channel: str, event: str, data: str, maxlen: int = 1000
) -> tuple[str, int]:
    """Publish one event with plain Redis commands, as docs/redis-contract.md says.

    MULTI/EXEC instead of the publisher's Lua script: WATCH the partition's two
    hashes, read the epoch, the next seq and the channel's previous seq, then
    queue HINCRBY, HSET, XADD and SPUBLISH; if anything changed in between, EXEC
    fails and we retry. A channel the index does not hold names the partition's
    `forgotten` (or 0) as its previous event.
    """
    p = d.partitions
    meta_key, channels_key = keys.meta_key(channel, p), keys.channels_key(channel, p)
    client = d.node(channel)
    client.hsetnx(meta_key, "epoch", secrets.token_hex(6))
    client.hsetnx(meta_key, "partitions", p)
    result: dict[str, Any] = {}

    def write(pipe: Pipeline) -> None:
        current: Any = pipe.hmget(meta_key, "epoch", "seq", "forgotten")
        epoch_b, seq_b, forgotten = current
        prev = int(pipe.hget(channels_key, channel) or forgotten or 0)
        epoch, seq = epoch_b.decode(), int(seq_b or 0) + 1
        pipe.multi()
        pipe.hsetnx(meta_key, "epoch", epoch)
        pipe.hincrby(meta_key, "seq", 1)
        pipe.hset(channels_key, channel, seq)
        pipe.execute_command(
            "XADD", keys.stream_key(channel, p), "MAXLEN", "~", maxlen, f"{seq}-0",
            "event", event, "data", data, "prev", prev,
        )  # fmt: skip
        pipe.execute_command("SPUBLISH", keys.live_key(channel, p), f"{epoch} {seq} {event} {data}")
        result.update(epoch=epoch, seq=seq)

    replies: Any = client.transaction(write, meta_key, channels_key)
    assert replies[1] == result["seq"], replies  # HINCRBY agreed with what we wrote
    return result["epoch"], result["seq"]


def partition_meta(d: Deployment, channel: str) -> tuple[str, int]:
    raw: Any = d.node(channel).hmget(d.meta_key(channel), "epoch", "seq")
    epoch, seq = raw
    assert epoch is not None
    return epoch.decode(), int(seq or 0)


def current_id(d: Deployment, channel: str) -> str:
    epoch, seq = partition_meta(d, channel)
    return f"{epoch}-{seq}"


def events_of(client: SSEClient) -> list[tuple[str, str, str]]:
    return [(e.id, e.event, e.data) for e in client.events]


def test_stream_delivers_events_written_with_plain_redis_commands(
    deployment: Deployment, channel: str
) -> None:
    a, b = names(deployment, channel, 2)
    client = open_stream(deployment.stream.url, [a, b])
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
            epoch, seq = contract_publish(deployment, target, event, data)
            expected.append((f"{epoch}-{seq}", event, data))
        client.wait_events(len(written))
        assert events_of(client) == expected
        assert client.last_id == expected[-1][0]
    finally:
        client.close()


def test_stream_replays_plain_redis_events_on_resume(deployment: Deployment, channel: str) -> None:
    d = deployment
    a, b = names(d, channel, 2)
    before = current_id(d, a)
    written = []
    for i, target in enumerate([a, b, a]):
        epoch, seq = contract_publish(d, target, "past", json.dumps({"i": i, "s": "a b"}))
        written.append((f"{epoch}-{seq}", "past", json.dumps({"i": i, "s": "a b"})))

    # Everything since `before` comes from history (it was written before the stream opened).
    client = open_stream(d.stream.url, [a, b], last_event_id=before)
    try:
        client.wait_events(3)
        assert events_of(client) == written
        # Then the stream is live: a new event follows the replay.
        epoch, seq = contract_publish(d, b, "now", '"live"')
        client.wait_events(4)
        assert events_of(client)[3] == (f"{epoch}-{seq}", "now", '"live"')
    finally:
        client.close()

    # A resume from the first event (Last-Event-ID header, as a browser reconnects) gets the rest.
    again = open_stream(d.stream.url, [a, b], header_id=written[0][0])
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
    deployment: Deployment, channel: str, reason: str
) -> None:
    d = deployment
    contract_publish(d, channel, "e", "1")
    epoch, seq = partition_meta(d, channel)
    if reason == "epoch_changed":
        other = ("0" if epoch[0] != "0" else "1") + epoch[1:]
        last = f"{other}-{seq}"
    else:
        last = f"{epoch}-{seq + 1000}"
    client = open_stream(d.stream.url, [channel], last_event_id=last)
    try:
        reset_id, data = wait_reset(client)
        assert data == {"reason": reason}
        # The reset carries the current position, from which the client continues.
        assert split_id(reset_id) == (epoch, seq)
        new_epoch, new_seq = contract_publish(d, channel, "after", '"x"')
        client.wait_events(2)
        assert events_of(client)[1] == (f"{new_epoch}-{new_seq}", "after", '"x"')
    finally:
        client.close()


@pytest.mark.parametrize("how", ["trimmed", "expired"])
def test_resume_across_lost_history_is_a_reset(deployment: Deployment, channel: str, how: str) -> None:
    d = deployment
    before = current_id(d, channel)
    seqs = [contract_publish(d, channel, "e", str(i))[1] for i in range(3)]
    node, stream = d.node(channel), keys.stream_key(channel, d.partitions)
    if how == "trimmed":
        assert node.xtrim(stream, maxlen=1, approximate=False) == 2
    else:
        assert node.delete(stream) == 1  # as if the idle TTL ran out
    client = open_stream(d.stream.url, [channel], last_event_id=before)
    try:
        reset_id, data = wait_reset(client)
        assert data == {"reason": "history_trimmed"}
        assert split_id(reset_id)[1] >= seqs[-1]
    finally:
        client.close()

    # From an id after the lost events, nothing is missing: no reset, just what is left.
    after_lost = seqs[1] if how == "trimmed" else seqs[2]
    later = open_stream(d.stream.url, [channel], last_event_id=f"{split_id(before)[0]}-{after_lost}")
    try:
        if how == "trimmed":
            later.wait_events(1)
            assert events_of(later)[0][1:] == ("e", "2")
        epoch, seq = contract_publish(d, channel, "fresh", "3")
        later.wait_for(lambda: any(e.event == "fresh" for e in later.events))
        assert [e.event for e in later.events] == (["e"] if how == "trimmed" else []) + ["fresh"]
        assert later.events[-1].id == f"{epoch}-{seq}"
    finally:
        later.close()


def test_resume_with_trimming_before_the_id_is_not_a_reset(deployment: Deployment, channel: str) -> None:
    d = deployment
    quiet, busy = names(d, channel, 2)
    contract_publish(d, quiet, "old", "0")
    for i in range(5):
        contract_publish(d, busy, "e", str(i))
    # Trimming removes only events the client has already seen.
    stream = keys.stream_key(busy, d.partitions)
    assert d.node(busy).xtrim(stream, maxlen=1, approximate=False) == 4
    last = current_id(d, busy)
    epoch, seq = contract_publish(d, busy, "e", "5")
    client = open_stream(d.stream.url, [quiet, busy], last_event_id=last)
    try:
        client.wait_events(1)
        new_epoch, new_seq = contract_publish(d, quiet, "new", "1")
        client.wait_events(2)
        assert events_of(client) == [(f"{epoch}-{seq}", "e", "5"), (f"{new_epoch}-{new_seq}", "new", "1")]
    finally:
        client.close()


def test_a_stream_over_several_partitions_sends_and_resumes_a_vector_id(
    deployment: Deployment, channel: str
) -> None:
    """With PARTITIONS > 1 two channels in different partitions give a vector id;
    with PARTITIONS = 1 (every channel in partition 0) the id keeps its plain form."""
    d = deployment
    if d.partitions == 1:
        a, b = channel + ".a", channel + ".b"
    else:
        a, b = keys.channels_in_distinct_partitions(channel, 2, d.partitions)
    pa, pb = keys.partition(a, d.partitions), keys.partition(b, d.partitions)
    client = open_stream(d.stream.url, [a, b])
    try:
        ea, sa = contract_publish(d, a, "e", '"a"')
        eb, sb = contract_publish(d, b, "e", '"b"')
        client.wait_events(2)
        if d.partitions == 1:
            assert client.last_id == f"{eb}-{sb}"
        else:
            # One entry per partition, sorted by partition: `<p>.<epoch>-<seq>` joined by `_`.
            entries = {pa: f"{pa}.{ea}-{sa}", pb: f"{pb}.{eb}-{sb}"}
            assert client.last_id == "_".join(entries[p] for p in sorted(entries))
        last = client.last_id
    finally:
        client.close()
    for target in (b, a, b):
        contract_publish(d, target, "m", f'"{target}"')
    resumed = open_stream(d.stream.url, [a, b], last_event_id=last)
    try:
        resumed.wait_events(3)
        got = sorted((e.event, e.data) for e in resumed.events)
        assert got == sorted(("m", f'"{t}"') for t in (b, a, b))
    finally:
        resumed.close()
