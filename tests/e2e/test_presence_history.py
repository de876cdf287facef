"""Presence and history through the Compose stack's nginx: `/channels/<channel>`
goes to the publisher (with the publish token), `/history` to the stream service."""

from __future__ import annotations

import requests

from tests.e2e.support import Stack, iter_frames, until_live, wait_until


def presence(stack: Stack, channel: str, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return stack.session.get(stack.url(f"/channels/{channel}"), headers=headers, timeout=10)


def test_presence_through_nginx_counts_open_streams_and_needs_the_token(stack: Stack, channel: str) -> None:
    refused = presence(stack, channel, None)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    streams = [stack.open_stream([channel]) for _ in range(3)]
    # Kept: a reader dropped and collected closes its stream.
    readers = [iter_frames(response, timeout=30) for response in streams]
    try:
        for frames in readers:
            until_live(frames)

        def counted() -> bool:
            answer = presence(stack, channel, stack.token)
            return answer.status_code == 200 and answer.json() == {"channel": channel, "subscribers": 3}

        wait_until(counted, 10, "3 subscribers counted")
    finally:
        for response in streams:
            response.close()
    wait_until(lambda: presence(stack, channel, stack.token).json()["subscribers"] == 0, 10, "0 counted")


def test_history_through_nginx_then_the_stream_from_its_last_id(stack: Stack, channel: str) -> None:
    ids = [stack.publish(channel, {"n": n}) for n in range(5)]
    params = {"channel": channel, "limit": "3"}
    answer = stack.session.get(stack.url("/history"), params=params, timeout=10)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [e["id"] for e in body["events"]] == ids[2:] and body["last_id"] == ids[-1]
    assert [e["data"] for e in body["events"]] == [{"n": 2}, {"n": 3}, {"n": 4}]
    bad = stack.session.get(stack.url("/history"), params={"channel": channel, "limit": "x"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_limit"
    response = stack.open_stream([channel], query_id=body["last_id"])
    try:
        frames = iter_frames(response, timeout=15)
        until_live(frames)
        new = stack.publish(channel, {"n": 5})
        event = next(f.event for f in frames if f.event is not None)
        assert event.id == new and event.data == '{"n":5}'
    finally:
        response.close()
