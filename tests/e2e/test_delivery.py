"""Publishing and receiving through nginx: frames, latency, resume, heartbeats."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytest

from tests.e2e.support import Stack, iter_frames, seq_of, sse_events, until_live

pytestmark = pytest.mark.e2e


def test_published_event_reaches_an_sse_client(stack: Stack, channel: str) -> None:
    """An SSE client gets the event with its id, type and data."""
    first = stack.publish(channel, {"n": 0}, event="warmup")
    response = stack.open_stream([channel], query_id=first)
    try:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "gzip" not in response.headers.get("Content-Encoding", "")
        event_id = stack.publish(channel, {"text": "héllo", "n": 1}, event="greeting")
        event = next(iter(sse_events(response)))
        assert (event.id, event.event) == (event_id, "greeting")
        assert json.loads(event.data) == {"text": "héllo", "n": 1}
    finally:
        response.close()


def test_stream_starts_with_comment_retry_and_position(stack: Stack, channel: str) -> None:
    """Comment, `retry:`, an id-only frame with the start position, then events."""
    response = stack.open_stream([channel])
    try:
        frames = iter_frames(response)
        first = next(frames)
        assert first.comments and not first.fields and not first.data
        retry = next(frames)
        assert retry.fields == {"retry": stack.settings["RETRY_MS"]}
        position = next(frames)
        assert set(position.fields) == {"id"} and not position.data
        event_id = stack.publish(channel, [1, 2, 3], event="tick")
        event = next(f for f in frames if f.data)
        assert event.fields == {"id": event_id, "event": "tick"}
        assert event.data == ["[1,2,3]"]
        assert seq_of(event_id) > seq_of(position.fields["id"])
    finally:
        response.close()


def test_events_arrive_at_once_through_nginx(
    stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    """No buffering anywhere: publish-to-receive latency well under a second."""
    response = stack.open_stream([channel])
    latencies = []
    try:
        frames = iter_frames(response)
        until_live(frames)
        for n in range(10):
            sent = time.monotonic()
            event_id = stack.publish(channel, {"n": n}, event="tick")
            frame = next(f for f in frames if f.data)
            assert frame.fields["id"] == event_id
            latencies.append(frame.at - sent)
    finally:
        response.close()
    measurements["publish->receive latency through nginx, ms (median/max of 10)"] = (
        f"{statistics.median(latencies) * 1000:.1f} / {max(latencies) * 1000:.1f}"
    )
    assert max(latencies) < 1.0, latencies


def test_resume_with_last_event_id_header_and_query(stack: Stack, channel: str) -> None:
    ids = [stack.publish(channel, {"n": n}) for n in range(5)]
    for header, query in ((ids[1], None), (None, ids[1])):
        response = stack.open_stream([channel], last_event_id=header, query_id=query)
        try:
            events = sse_events(response)
            got = [next(events) for _ in range(3)]
        finally:
            response.close()
        assert [e.id for e in got] == ids[2:], (header, query)
        assert [json.loads(e.data)["n"] for e in got] == [2, 3, 4]


def test_header_wins_over_query_on_reconnect(stack: Stack, channel: str) -> None:
    """A browser reconnects to the same URL (old ?lastEventId=) plus Last-Event-ID."""
    ids = [stack.publish(channel, {"n": n}) for n in range(4)]
    response = stack.open_stream([channel], query_id=ids[0], last_event_id=ids[2])
    try:
        event = next(iter(sse_events(response)))
    finally:
        response.close()
    assert event.id == ids[3]


def test_several_channels_in_publish_order(stack: Stack, channel: str) -> None:
    other = channel + ".b"
    start = stack.publish(channel, "start")
    published = [stack.publish(channel if n % 2 else other, {"n": n}) for n in range(6)]
    response = stack.open_stream([channel, other], query_id=start)
    try:
        events = sse_events(response)
        got = [next(events).id for _ in range(6)]
    finally:
        response.close()
    assert got == published


def test_heartbeats_pass_through_nginx(stack: Stack, channel: str) -> None:
    """An idle stream gets heartbeat comments every HEARTBEAT_SECONDS."""
    beat = float(stack.settings["HEARTBEAT_SECONDS"])
    response = stack.open_stream([channel], read_timeout=beat * 3)
    try:
        frames = iter_frames(response)
        until_live(frames)
        assert "id" in next(frames).fields  # the position
        start = time.monotonic()
        comments = [next(frames), next(frames)]
    finally:
        response.close()
    assert all(f.comments and not f.data for f in comments)
    elapsed = comments[1].at - start
    assert beat * 0.8 < elapsed < beat * 2 + 1.5, elapsed
