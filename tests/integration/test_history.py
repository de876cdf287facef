"""`GET /history` on both deployments: recent events, pages after an id, and the
`last_id` to open `/stream` from, with no gap and no duplicate in between."""

from __future__ import annotations

from typing import Any

import requests

from tests.integration.conftest import Deployment
from tests.support.sse_client import open_stream


def history(d: Deployment, channels: list[str], **params: Any) -> requests.Response:
    query = [("channel", c) for c in channels] + list(params.items())
    return requests.get(f"{d.stream.url}/history", params=query, timeout=10)


def page(d: Deployment, channels: list[str], **params: Any) -> dict[str, Any]:
    answer = history(d, channels, **params)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_recent_events_then_the_stream_from_last_id_miss_and_repeat_nothing(
    deployment: Deployment, channel: str
) -> None:
    d = deployment
    a, b = channel + ".a", channel + ".b"
    sent = [(c, d.publish(c, {"n": n, "c": c}, event="e")) for n in range(6) for c in (a, b)]
    body = page(d, [a, b], limit=4)
    got = body["events"]
    assert len(got) == 4 and body["reset"] is None
    assert {e["channel"] for e in got} <= {a, b}
    assert all(e["event"] == "e" and e["data"]["c"] == e["channel"] for e in got)
    # The most recent ones, each channel in publish order.
    for c in (a, b):
        ns = [e["data"]["n"] for e in got if e["channel"] == c]
        assert ns == sorted(ns) and (not ns or ns[-1] == 5)
    ids = {e["id"] for e in got}
    assert ids <= {i for _, i in sent}
    # Live from last_id: exactly what is published afterwards.
    client = open_stream(d.stream.url, [a, b], last_event_id=body["last_id"])
    try:
        later = [d.publish(c, {"n": 100 + n, "c": c}, event="e") for n, c in enumerate((b, a, b))]
        client.wait_events(3)
        assert [e.json()["n"] for e in client.events] == [100, 101, 102]
        assert not ids & set(later)
    finally:
        client.close()


def test_pages_after_an_id_cover_everything_exactly_once(deployment: Deployment, channel: str) -> None:
    d = deployment
    a, b = channel + ".a", channel + ".b"
    start = page(d, [a, b], limit=1)["last_id"]  # the position before anything below
    sent = {(c, n) for n in range(7) for c in (a, b)}
    for n in range(7):
        for c in (a, b):
            d.publish(c, {"n": n, "c": c})
    seen: list[tuple[str, int]] = []
    after = start
    for _ in range(20):
        body = page(d, [a, b], after=after, limit=3)
        assert body["reset"] is None and len(body["events"]) <= 3
        seen += [(e["channel"], e["data"]["n"]) for e in body["events"]]
        if not body["events"]:
            break
        after = body["last_id"]
    assert len(seen) == len(set(seen)) and set(seen) == sent
    for c in (a, b):
        ns = [n for ch, n in seen if ch == c]
        assert ns == sorted(ns)
    # The last page's last_id resumes the stream after everything.
    client = open_stream(d.stream.url, [a, b], last_event_id=after)
    try:
        d.publish(a, {"n": 99, "c": a})
        (event,) = client.wait_events(1)
        assert event.json()["n"] == 99
    finally:
        client.close()


def test_an_id_history_cannot_cover_is_a_reset_with_the_current_position(
    deployment: Deployment, channel: str
) -> None:
    d = deployment
    first = d.publish(channel, 1)
    epoch, seq = first.split("-")
    other = ("0" if epoch[0] != "0" else "1") + epoch[1:]
    body = page(d, [channel], after=f"{other}-{seq}")
    assert body["events"] == [] and body["reset"] == "epoch_changed"
    assert body["last_id"].split("-")[0] == epoch
    ahead = page(d, [channel], after=f"{epoch}-{int(seq) + 10**6}")
    assert ahead["reset"] == "unknown_id"


def test_bad_history_requests_get_json_errors(deployment: Deployment, channel: str) -> None:
    d = deployment
    cases = [
        ([], {}, "missing_channel"),
        ([channel], {"limit": "0"}, "invalid_limit"),
        ([channel], {"limit": "1001"}, "invalid_limit"),
        ([channel], {"limit": "ten"}, "invalid_limit"),
        ([channel], {"after": "not-an-id"}, "invalid_after"),
        (["bad channel"], {}, "invalid_channel"),
    ]
    for channels, params, code in cases:
        answer = history(d, channels, **params)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["error"] == code
    private = history(d, ["private-x"])
    assert private.status_code in (401, 403) and "error" in private.json()
