"""nginx itself: what is reachable, and that every error it produces is JSON."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.e2e.support import Stack, wait_until

pytestmark = pytest.mark.e2e


def assert_json_error(response: requests.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].split(";")[0] == "application/json", response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    if code is not None:
        assert body["error"] == code, body
    return body


def test_healthz_is_answered_by_nginx(stack: Stack) -> None:
    response = requests.get(stack.url("/healthz"), timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok"}


def test_demo_page_and_assets_are_served(stack: Stack) -> None:
    page = requests.get(stack.url("/"), timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for element in ('id="channel"', 'id="connect"', 'id="state"', 'id="events"', 'id="publish"'):
        assert element in page.text
    script = requests.get(stack.url("/js/app.js"), timeout=5)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    css = requests.get(stack.url("/css/app.css"), timeout=5)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")


@pytest.mark.parametrize(
    "path", ["/readyz", "/stats", "/metrics", "/nope", "/stream/x", "/publish/x", "/_herald/error/404"]
)
def test_internal_endpoints_and_unknown_paths_are_json_404(stack: Stack, path: str) -> None:
    assert_json_error(requests.get(stack.url(path), timeout=5), 404, "not_found")


def test_wrong_method_on_static_files_is_json_405(stack: Stack) -> None:
    assert_json_error(requests.delete(stack.url("/"), timeout=5), 405, "method_not_allowed")


def test_too_long_uri_and_header_are_json(stack: Stack) -> None:
    assert_json_error(requests.get(stack.url("/" + "a" * 9000), timeout=5), 414, "uri_too_long")
    big_header = {"X-Big": "b" * 20000}
    assert_json_error(requests.get(stack.url("/"), headers=big_header, timeout=5), 400, "header_too_large")


def test_body_over_max_body_bytes_is_refused_by_nginx(stack: Stack) -> None:
    limit = int(stack.settings["MAX_BODY_BYTES"])
    payload = json.dumps({"channel": "x", "data": "a" * limit})
    body = assert_json_error(stack.publish_raw(payload), 413, "body_too_large")
    assert str(limit) in body["message"]


def test_errors_of_the_publisher_pass_through_unchanged(stack: Stack, channel: str) -> None:
    """Below nginx's limit the publisher judges: its own JSON errors come through."""
    unauthorized = stack.publish_raw({"channel": channel, "data": 1}, token=None)
    assert_json_error(unauthorized, 401, "unauthorized")
    assert unauthorized.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = stack.publish_raw({"channel": channel, "data": 1}, token="wrong")
    assert_json_error(wrong, 401, "unauthorized")
    too_big_event = stack.publish_raw({"channel": channel, "data": "a" * 70000})
    assert_json_error(too_big_event, 413, "event_too_large")
    assert_json_error(stack.publish_raw(b"{not json"), 400)


def test_publish_rate_limit_answers_json_429(stack: Stack, measurements: dict[str, Any]) -> None:
    """Per client IP; GET /publish is cheap (the publisher answers 405) and counts too."""
    session = requests.Session()
    url = stack.url("/publish")

    def hit(_: int) -> requests.Response:
        return session.get(url, timeout=5)

    limited: requests.Response | None = None
    sent = 0
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        while limited is None and sent < 4000 and time.monotonic() < deadline:
            for response in pool.map(hit, range(100)):
                sent += 1
                if response.status_code == 429 and limited is None:
                    limited = response
    session.close()
    assert limited is not None, f"no 429 after {sent} requests"
    measurements["requests until the first 429 (rate/burst per IP)"] = (
        f"{sent} ({stack.settings['PUBLISH_RATE']}, burst {stack.settings['PUBLISH_BURST']})"
    )
    assert_json_error(limited, 429, "rate_limited")
    assert limited.headers.get("Retry-After") == "1"
    # The bucket drains at the configured rate: wait until it is empty again, so
    # that the tests after this one are not limited (nginx allows the burst with
    # `nodelay`, so a single 202 would not prove the bucket is empty).
    rate = float(stack.settings["PUBLISH_RATE"].removesuffix("r/s"))
    drained_at = time.monotonic() + float(stack.settings["PUBLISH_BURST"]) / rate + 0.5
    while (left := drained_at - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
    wait_until(
        lambda: stack.publish_raw({"channel": "e2e.after-limit", "data": 1}).status_code == 202,
        15,
        "publishing to work again after the rate limit",
        0.5,
    )


def test_nginx_request_id_reaches_the_services(stack: Stack, channel: str) -> None:
    """nginx sets X-Request-ID ($request_id, replacing the client's); the services echo it."""
    answer = stack.publish_raw({"channel": channel, "data": 1}, headers={"X-Request-ID": "client-chosen"})
    assert answer.status_code == 202
    request_id = answer.headers.get("X-Request-ID", "")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
    wait_until(
        lambda: any(f"rid={request_id}" in line for line in stack.nginx_log()), 10, "the id in nginx's log"
    )
    with stack.open_stream([channel]) as stream:
        assert re.fullmatch(r"[0-9a-f]{32}", stream.headers.get("X-Request-ID", "")), stream.headers


def test_query_tokens_stay_out_of_the_access_log(stack: Stack, channel: str) -> None:
    secret = "e2e-secret-" + channel
    requests.get(stack.url(f"/stream?channel=private-{channel}&token={secret}"), timeout=10).close()

    def logged() -> list[str]:
        return [line for line in stack.nginx_log() if f"private-{channel}" in line]

    lines = wait_until(logged, 10, "the request in nginx's log")
    assert all(secret not in line and "token=[redacted]" in line for line in lines), lines
