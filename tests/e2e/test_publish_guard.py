"""Who may publish, and Redis's memory ceiling, tried through the Compose stack's
nginx (issue 16, items 3 and 4; the rules are publisher/guard.py, the ceiling
REDIS_MAXMEMORY):

- a page on another site cannot publish, with the token or without;
- a stack without PUBLISH_TOKEN answers only requests for a loopback host
  (a DNS-rebinding page cannot use it), and refuses to start on any other
  address unless PUBLISH_OPEN=true;
- a full Redis refuses whole publishes (JSON 503 redis_full, Retry-After):
  every event answered 202 is in history, and no refused one is.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import running_stack
from tests.e2e.support import Stack

pytestmark = pytest.mark.e2e

# No token, and a Redis of 24 MB: filled in a few seconds.
OPEN_SETTINGS = {
    "PUBLISH_TOKEN": "",
    "REDIS_MAXMEMORY": "24mb",
    "READ_RATE": "200r/s",
    "READ_BURST": "400",
}


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("herald-open"), OPEN_SETTINGS) as the_stack:
        yield the_stack


def test_a_page_on_another_site_cannot_publish_with_the_token_or_without(stack: Stack, channel: str) -> None:
    for token in ("default", None):
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            answer = stack.publish_raw({"channel": channel, "data": 1}, token=token, headers=headers)
            assert answer.status_code == 403, (headers, answer.text)
            assert answer.json()["error"] == "cross_site"
    # A form, as a page posts it without a preflight.
    form = requests.post(
        stack.url("/publish"),
        data={"channel": channel, "data": "x"},
        headers={"Origin": "http://evil.example", "Authorization": f"Bearer {stack.token}"},
        timeout=10,
    )
    assert form.status_code == 403 and form.json()["error"] == "cross_site"
    # The page's own origin, and clients that are no browser, publish.
    own = stack.publish_raw({"channel": channel, "data": 2}, headers={"Origin": stack.base_url})
    assert own.status_code == 202, own.text
    assert stack.publish_raw({"channel": channel, "data": 3}).status_code == 202
    history = requests.get(stack.url("/history"), params={"channel": channel}, timeout=10).json()
    assert [e["data"] for e in history["events"]] == [2, 3]


def test_without_a_token_only_a_loopback_host_may_publish(open_stack: Stack, channel: str) -> None:
    body = {"channel": channel, "data": "local"}
    assert open_stack.publish_raw(body, token=None).status_code == 202
    # A DNS-rebinding page reaches the same socket under its own name.
    rebound = open_stack.publish_raw(body, token=None, headers={"Host": f"evil.example:{open_stack.port}"})
    assert rebound.status_code == 403, rebound.text
    assert rebound.json()["error"] == "host_not_allowed"
    presence = requests.get(
        open_stack.url(f"/channels/{channel}"), headers={"Host": "evil.example"}, timeout=10
    )
    assert presence.status_code == 403 and presence.json()["error"] == "host_not_allowed"


def test_a_full_redis_refuses_whole_publishes_and_keeps_every_202(open_stack: Stack) -> None:
    channels = [f"full.{secrets.token_hex(4)}.{i}" for i in range(6)]
    pad = "x" * 4000
    accepted: dict[str, list[str]] = {c: [] for c in channels}
    refused: list[Any] = []
    for n in range(200):  # bounded: 24 MB fills in well under 200 requests of ~200 KB
        batch = [
            {"channel": channels[(n + i) % len(channels)], "data": {"n": n, "pad": pad}} for i in range(50)
        ]
        answer = open_stack.publish_raw(batch, token=None)
        if answer.status_code == 202:
            for event in answer.json()["events"]:
                accepted[event["channel"]].append(event["id"])
            continue
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "redis_full"
        assert int(answer.headers["Retry-After"]) >= 1
        refused.append(n)
        if len(refused) >= 3:
            break
    assert len(refused) == 3 and sum(map(len, accepted.values())) > 0
    epoch, seq = min(
        (i for ids in accepted.values() for i in ids), key=lambda i: int(i.rsplit("-", 1)[1])
    ).rsplit("-", 1)
    before_all = f"{epoch}-{int(seq) - 1}"
    for c in channels:
        stored = read_all(open_stack, c, before_all)
        assert stored == accepted[c], (c, len(stored), len(accepted[c]))


def read_all(stack: Stack, channel: str, after: str) -> list[str]:
    """Every event id of `channel` in history after `after`, paging through /history."""
    ids: list[str] = []
    for _ in range(100):
        page = requests.get(
            stack.url("/history"), params={"channel": channel, "after": after, "limit": "1000"}, timeout=10
        ).json()
        assert page["reset"] is None, page
        if not page["events"]:
            return ids
        ids += [e["id"] for e in page["events"]]
        after = page["last_id"]
    raise AssertionError("history did not end")


def test_a_tokenless_stack_on_another_address_refuses_to_start(tmp_path: Path) -> None:
    settings = {"PUBLISH_TOKEN": "", "HERALD_BIND": "0.0.0.0"}
    with pytest.raises(AssertionError, match="failed"), running_stack(tmp_path, settings):
        pass  # pragma: no cover - it must not come up
    log = (tmp_path / "compose.log").read_text()
    assert "PUBLISH_TOKEN" in log and "PUBLISH_OPEN" in log, log[-3000:]
