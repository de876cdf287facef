"""Who may publish, against the real gunicorn publisher: cross-site browser
requests are refused with or without a token; without a token only requests to
a loopback host are served; published beyond loopback without a token (and
without PUBLISH_OPEN=true) the publisher does not start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import post_events
from tests.support import keys
from tests.support.services import SERVICE_DIRS, Service, free_port

TOKEN = "guard-token"


def assert_refused(answer: requests.Response, code: str) -> None:
    assert answer.status_code == 403, (answer.status_code, answer.text)
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert "Access-Control-Allow-Origin" not in answer.headers


def presence(service: Service, channel: str, headers: dict[str, str]) -> requests.Response:
    return requests.get(f"{service.url}/channels/{channel}", headers=headers, timeout=5)


def preflight(service: Service, origin: str, site: str = "cross-site") -> requests.Response:
    headers = {
        "Origin": origin,
        "Sec-Fetch-Site": site,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    return requests.options(f"{service.url}/publish", headers=headers, timeout=5)


CROSS_SITE = [
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example"},
    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},
]


@pytest.mark.parametrize("with_token", [False, True])
def test_cross_site_requests_are_refused_with_a_token_or_without(
    start: Callable[..., Service], redis_client: redis.Redis, channel: str, with_token: bool
) -> None:
    pub = start("publisher", **({"PUBLISH_TOKEN": TOKEN} if with_token else {}))
    token = TOKEN if with_token else None
    auth = {"Authorization": f"Bearer {TOKEN}"} if with_token else {}
    for headers in CROSS_SITE:
        # A JSON body, and the form a page posts without any preflight.
        assert_refused(
            post_events(pub.url, {"channel": channel, "data": 1}, token, headers=headers), "cross_site"
        )
        form = requests.post(
            f"{pub.url}/publish",
            data={"channel": channel, "data": "x"},
            headers={**headers, **auth},
            timeout=5,
        )
        assert_refused(form, "cross_site")
        assert_refused(presence(pub, channel, {**headers, **auth}), "cross_site")
    assert_refused(preflight(pub, "https://evil.example"), "cross_site")
    assert_refused(preflight(pub, "null"), "cross_site")
    assert redis_client.exists(keys.stream_key(channel)) == 0  # nothing of them was stored
    # The page's own origin (the demo page, served by the same nginx) publishes.
    own = {"Origin": pub.url, "Sec-Fetch-Site": "same-origin"}
    answer = post_events(pub.url, {"channel": channel, "data": 2}, token, headers=own)
    assert answer.status_code == 202, answer.text
    assert (
        post_events(pub.url, {"channel": channel, "data": 3}, token, headers={"Origin": pub.url}).status_code
        == 202
    )
    # And so does a client that is no browser (no Origin, no Sec-Fetch-Site).
    assert post_events(pub.url, {"channel": channel, "data": 4}, token).status_code == 202
    assert redis_client.xlen(keys.stream_key(channel)) == 3


def test_an_allowed_origin_may_publish_cross_site(start: Callable[..., Service], channel: str) -> None:
    pub = start("publisher", CORS_ALLOWED_ORIGINS="https://app.example", PUBLISH_TOKEN=TOKEN)
    allowed = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
    answer = post_events(pub.url, {"channel": channel, "data": 1}, TOKEN, headers=allowed)
    assert answer.status_code == 202, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    ok = preflight(pub, "https://app.example")
    assert ok.status_code == 204 and ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert_refused(preflight(pub, "https://other.example"), "cross_site")
    other = {"Origin": "https://other.example", "Sec-Fetch-Site": "cross-site"}
    assert_refused(post_events(pub.url, {"channel": channel, "data": 1}, TOKEN, headers=other), "cross_site")


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.2:9", "[::1]:8080"])
def test_without_a_token_loopback_hosts_publish(publisher: Service, channel: str, host: str) -> None:
    answer = post_events(publisher.url, {"channel": channel, "data": 1}, headers={"Host": host})
    assert answer.status_code == 202, answer.text
    assert presence(publisher, channel, {"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "192.168.1.10", "herald"])
def test_without_a_token_other_hosts_are_refused_unless_publish_open(
    start: Callable[..., Service], publisher: Service, redis_client: redis.Redis, channel: str, host: str
) -> None:
    # DNS rebinding: a page whose name now points at 127.0.0.1 calls it by that name.
    answer = post_events(publisher.url, {"channel": channel, "data": 1}, headers={"Host": host})
    assert_refused(answer, "host_not_allowed")
    assert "PUBLISH_OPEN=true" in answer.json()["message"]
    assert_refused(presence(publisher, channel, {"Host": host}), "host_not_allowed")
    assert redis_client.exists(keys.stream_key(channel)) == 0
    # A token, or PUBLISH_OPEN=true, lifts the rule.
    with_token = start("publisher", PUBLISH_TOKEN=TOKEN)
    assert (
        post_events(
            with_token.url, {"channel": channel, "data": 2}, TOKEN, headers={"Host": host}
        ).status_code
        == 202
    )
    opened = start("publisher", PUBLISH_OPEN="true")
    assert post_events(opened.url, {"channel": channel, "data": 3}, headers={"Host": host}).status_code == 202
    assert "PUBLISH_OPEN=true" in opened.log()  # it says so in its log


def run_publisher(redis_url: str, logs_dir: Path, **env: str) -> tuple[int, str]:
    """Start the publisher's gunicorn and wait for it to exit (it should not start)."""
    import os

    full_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BIND": f"127.0.0.1:{free_port()}",
        "WEB_CONCURRENCY": "1",
        **env,
    }
    run = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"],
        cwd=SERVICE_DIRS["publisher"],
        env=full_env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (run.stdout + run.stderr).decode(errors="replace")
    (logs_dir / f"publisher-refused-{env.get('HERALD_BIND')}.log").write_text(output)
    return run.returncode, output


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.168.1.10"])
def test_published_beyond_loopback_without_a_token_the_publisher_exits_and_says_why(
    redis_url: str, logs_dir: Path, start: Callable[..., Service], bind: str
) -> None:
    code, output = run_publisher(redis_url, logs_dir, HERALD_BIND=bind, PUBLISH_TOKEN="")
    assert code != 0, output
    assert f"HERALD_BIND={bind}" in output and "PUBLISH_TOKEN is empty" in output, output
    assert "PUBLISH_OPEN=true" in output
    # Either way out starts it.
    start("publisher", HERALD_BIND=bind, PUBLISH_TOKEN=TOKEN)
    start("publisher", HERALD_BIND=bind, PUBLISH_OPEN="true")


def test_existing_answers_keep_their_shape(publisher: Service, channel: str) -> None:
    """/healthz and /readyz are not guarded: the container health checks send no Host."""
    for path in ("/healthz", "/readyz"):
        answer: Any = requests.get(publisher.url + path, headers={"Host": "anything"}, timeout=5)
        assert answer.status_code == 200
