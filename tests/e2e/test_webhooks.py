"""Lifecycle webhooks through the Compose stack (issue 20), trying to break them:
streams through nginx on two stream replicas, the stack's own webhook-dispatcher,
and a receiver container on the stack's network (webhook_receiver.py) that the
tests make fail, time out, die and come back.

What must hold, whatever happens: per channel, `channel.occupied` and
`channel.vacated` strictly alternate, one pair per real transition (a reload
within the delay sends nothing); every event reaches the receiver, in order per
channel; a duplicate only ever carries the same webhook-id; every request is
signed by both secrets of a rotation.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from herald_client import WebhookVerificationError, verify_webhook

from tests.e2e.conftest import running_stack
from tests.e2e.support import Stack, wait_until
from tests.e2e.webhooks import (
    DELAY,
    GAP,
    NEW_SECRET,
    OLD_SECRET,
    RECEIVER_FILE,
    RETRY_WINDOW,
    TIMEOUT,
    TTL,
    Hooks,
    events_of,
    subscribe,
    visit,
    wait_kinds,
    webhook_settings,
)


@pytest.fixture(scope="module")
def hooks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webhook-receiver")


@pytest.fixture(scope="module")
def hooks_stack(tmp_path_factory: pytest.TempPathFactory, hooks_dir: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("herald-e2e-webhooks")
    with running_stack(workdir, webhook_settings(hooks_dir), files=("compose.yaml", RECEIVER_FILE)) as stack:
        stack.scale_streams(2)
        yield stack


@pytest.fixture
def hooks(hooks_stack: Stack, hooks_dir: Path) -> Iterator[Hooks]:
    h = Hooks(hooks_dir)
    h.answer()
    yield h
    h.answer()


def fresh(name: str) -> str:
    return f"e2e.hooks.{name}.{secrets.token_hex(4)}"


def test_streams_churning_on_two_replicas_make_one_pair_per_transition(
    hooks_stack: Stack, hooks: Hooks
) -> None:
    stack = hooks_stack
    channels = [fresh(f"churn{i}") for i in range(3)]
    for _ in range(2):
        opened = [subscribe(stack, c) for c in channels for _ in range(3)]
        replicas = [stack.established_streams(c) for c in stack.containers("stream-service")]
        assert all(n > 0 for n in replicas), f"streams not spread over both replicas: {replicas}"
        time.sleep(1.2)
        # A page reload on each channel: one stream closed and opened again at once.
        for i in range(0, len(opened), 3):
            opened[i].close()
            opened[i] = subscribe(stack, channels[i // 3])
        time.sleep(1.2)
        for response in opened:
            response.close()
        time.sleep(GAP)
    for c in channels:
        wait_kinds(hooks, c, ["occupied", "vacated"] * 2)
    time.sleep(GAP)  # and nothing more comes
    for c in channels:
        assert hooks.kinds(c) == ["occupied", "vacated"] * 2
        for r in hooks.on(c):
            assert r["headers"]["webhook-id"] == events_of(r)[0]["id"]


def test_a_reload_within_the_delay_sends_nothing(hooks_stack: Stack, hooks: Hooks) -> None:
    channel = fresh("reload")
    first = subscribe(hooks_stack, channel)
    wait_kinds(hooks, channel, ["occupied"])
    first.close()
    time.sleep(DELAY / 4)
    again = subscribe(hooks_stack, channel)
    time.sleep(GAP)
    assert hooks.kinds(channel) == ["occupied"], "a reload sent vacated"
    again.close()
    wait_kinds(hooks, channel, ["occupied", "vacated"])
    vacated = hooks.taken(channel)[1]
    assert vacated["type"] == "channel.vacated"


def test_a_replica_killed_counts_as_gone_after_ttl_plus_delay(hooks_stack: Stack, hooks: Hooks) -> None:
    stack = hooks_stack
    channel = fresh("killed")
    response = subscribe(stack, channel)
    wait_kinds(hooks, channel, ["occupied"])
    holders = [c for c in stack.containers("stream-service") if stack.established_streams(c)]
    assert len(holders) == 1, holders
    stack.docker("kill", "--signal", "KILL", holders[0])
    killed = time.time()
    response.close()
    try:
        wait_kinds(hooks, channel, ["occupied", "vacated"], timeout=TTL + DELAY + 10)
        vacated_at = iso_seconds(hooks.taken(channel)[1]["timestamp"])
        # The replica's last refresh was at most TTL/3 (plus its one-second tick) before it died.
        assert killed + TTL - TTL / 3 - 1.5 + DELAY <= vacated_at <= killed + TTL + DELAY + 1.0
        time.sleep(GAP)
        assert hooks.kinds(channel) == ["occupied", "vacated"], "more than one vacated"
    finally:
        stack.scale_streams(2)


def test_every_event_arrives_through_failures_timeouts_and_a_dead_receiver(
    hooks_stack: Stack, hooks: Hooks
) -> None:
    stack = hooks_stack
    channels = [fresh(f"outage{i}") for i in range(3)]
    receiver = stack.containers("webhook-receiver")[0]
    pairs = 0

    def churn() -> None:
        nonlocal pairs
        opened = [subscribe(stack, c) for c in channels]
        time.sleep(1.2)
        for response in opened:
            response.close()
        time.sleep(GAP)
        pairs += 1

    hooks.answer(status=500)
    churn()
    hooks.answer(status=503, retry_after=1)
    churn()
    hooks.answer(status=204, delay=TIMEOUT + 2)  # answered after the dispatcher gave up
    churn()
    stack.docker("kill", "--signal", "KILL", receiver)
    churn()
    hooks.answer()
    stack.docker("start", receiver)
    for c in channels:
        wait_kinds(hooks, c, ["occupied", "vacated"] * pairs, timeout=30)
    requests_made = events_made = 0
    for c in channels:
        records = hooks.on(c)
        ids: dict[str, str] = {}
        for r in records:
            for e in events_of(r):
                assert ids.setdefault(e["id"], r["headers"]["webhook-id"]) == r["headers"]["webhook-id"]
        requests_made, events_made = requests_made + len(records), events_made + len(ids)
        taken = hooks.taken(c)
        assert [e["timestamp"] for e in taken] == sorted(e["timestamp"] for e in taken), "out of order"
    # (A channel whose lane waited behind another's retries may have had no failure of its own.)
    assert requests_made > events_made, "the failures caused no redelivery at all"


def test_a_dispatcher_killed_between_a_post_and_its_acknowledgement(hooks_stack: Stack, hooks: Hooks) -> None:
    stack = hooks_stack
    channel = fresh("ack")
    dispatcher = stack.containers("webhook-dispatcher")[0]
    hooks.answer(status=204, delay=1.5)  # holds the answer while the dispatcher is killed
    response = subscribe(stack, channel)
    wait_until(lambda: hooks.on(channel), 10, "the POST of channel.occupied")
    stack.docker("kill", "--signal", "KILL", dispatcher)
    killed = time.time()
    hooks.answer()
    stack.docker("start", dispatcher)
    try:
        wait_until(lambda: len(hooks.on(channel)) >= 2, 30, "channel.occupied sent again")
        first, again = hooks.on(channel)[:2]
        assert first["headers"]["webhook-id"] == again["headers"]["webhook-id"]
        assert again["at"] >= killed, "sent again before the kill"
        assert hooks.kinds(channel) == ["occupied"]
    finally:
        response.close()
        stack.wait_healthy("webhook-dispatcher", 1, timeout=60)
    wait_kinds(hooks, channel, ["occupied", "vacated"])


def test_signatures_hold_for_both_secrets_and_nothing_else(hooks_stack: Stack, hooks: Hooks) -> None:
    channel = fresh("signed")
    visit(hooks_stack, channel)
    wait_kinds(hooks, channel, ["occupied", "vacated"])
    record = hooks.on(channel)[0]
    body, headers = record["body"].encode(), record["headers"]
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (NEW_SECRET, OLD_SECRET):
        assert verify_webhook(body, headers, secret)["data"]["channel"] == channel
    tampered = body.replace(channel.encode(), channel[:-1].encode() + b"X")
    with pytest.raises(WebhookVerificationError):
        verify_webhook(tampered, headers, NEW_SECRET)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, NEW_SECRET, now=record["at"] + 600)
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, headers, other)


def test_dead_letters_are_listed_and_replayed(hooks_stack: Stack, hooks: Hooks) -> None:
    stack = hooks_stack
    channel = fresh("dead")
    hooks.answer(status=500)
    visit(stack, channel)
    wait_until(lambda: len(dead_letters(stack, channel)) == 2, RETRY_WINDOW + GAP + 15, "two dead letters")
    failed = {r["headers"]["webhook-id"] for r in hooks.on(channel)}
    assert hooks.kinds(channel) == []
    hooks.answer()
    out = stack.compose("exec", "-T", "webhook-dispatcher", "python", "-m", "dispatcher", "replay", "--all")
    assert json.loads(out.stdout)["replayed"] >= 2
    wait_kinds(hooks, channel, ["occupied", "vacated"])
    assert {e["id"] for e in hooks.taken(channel)} == failed, "a replay keeps the ids"
    assert dead_letters(stack, channel) == []
    metrics = stack.internal_get(stack.containers("webhook-dispatcher")[0], "/metrics")
    assert 'herald_webhook_events_dead_lettered_total{endpoint="0"}' in metrics


def dead_letters(stack: Stack, channel: str) -> list[dict[str, Any]]:
    out = stack.compose("exec", "-T", "webhook-dispatcher", "python", "-m", "dispatcher", "dead-letters")
    letters = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return [d for d in letters if d["channel"] == channel]


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
