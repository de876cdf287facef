"""The demo page in headless Chromium, through nginx.

Needs Debian's chromium and chromium-driver and selenium (tests/e2e/browser.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.browser import headless_chromium
from tests.e2e.support import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium("--window-size=1200,900") as driver:
        yield driver


def _by_id(browser: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def _fill(browser: Any, element_id: str, text: str) -> None:
    element = _by_id(browser, element_id)
    element.clear()
    element.send_keys(text)


def _shown_events(browser: Any) -> list[tuple[str, str, str]]:
    """(id, event, data) of every row of #events, in page order."""
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#events li')].map("
        "li => [li.dataset.id, li.dataset.event, li.dataset.data]);"
    )
    return [tuple(row) for row in rows]


def _state(browser: Any) -> str:
    return str(_by_id(browser, "state").get_attribute("data-state"))


def test_demo_page_receives_publishes_and_recovers(
    stack: Stack, browser: Any, channel: str, measurements: dict[str, Any]
) -> None:
    browser.get(stack.url("/"))
    _fill(browser, "channel", channel)
    _by_id(browser, "connect").click()
    wait_until(lambda: _state(browser) == "open", 15, "the page to open its stream")

    # An event published by a backend shows up with its id, type and data.
    first = stack.publish(channel, {"text": "from the backend"}, event="chat")
    wait_until(lambda: any(row[0] == first for row in _shown_events(browser)), 10, "the event in the page")
    compact = json.dumps({"text": "from the backend"}, separators=(",", ":"))
    assert _shown_events(browser)[-1] == (first, "chat", compact)

    # The publish form: a wrong token shows the publisher's JSON error ...
    _fill(browser, "pub-channel", channel)
    _fill(browser, "pub-event", "tick")
    _fill(browser, "pub-data", '{"n": 1}')
    _fill(browser, "pub-token", "not-the-token")
    _by_id(browser, "publish").click()
    wait_until(lambda: _by_id(browser, "pub-result").get_attribute("data-status") == "401", 10, "a 401")
    assert "unauthorized" in _by_id(browser, "pub-result").text
    # ... the right one publishes, and the event comes back over the stream.
    _fill(browser, "pub-token", stack.token)
    _by_id(browser, "publish").click()
    wait_until(lambda: _by_id(browser, "pub-result").get_attribute("data-status") == "202", 10, "a 202")
    second = _by_id(browser, "pub-result").get_attribute("data-id")
    wait_until(lambda: any(row[0] == second for row in _shown_events(browser)), 10, "the form's event")

    # Stop every stream replica (the one the page is on included): the stream
    # ends and nginx answers 502 while none is up; the page (through
    # /herald.js) must keep reconnecting and resume from the last id it saw.
    replicas = len(stack.containers("stream-service"))
    began = time.monotonic()
    stack.compose("stop", "stream-service", timeout=120)
    wait_until(
        lambda: int(_by_id(browser, "state").get_attribute("data-recreated")) >= 1,
        20,
        "the page to reconnect",
    )
    assert _state(browser) in ("reconnecting", "connecting")
    during = stack.publish(channel, {"while": "down"}, event="tick")
    stack.scale_streams(replicas)
    wait_until(lambda: _state(browser) == "open", 60, "the page to be open again", 0.2)
    measurements["browser: replicas stopped -> page open again, s"] = round(time.monotonic() - began, 1)
    after = stack.publish(channel, {"after": "restart"}, event="chat")
    wait_until(lambda: any(row[0] == after for row in _shown_events(browser)), 15, "events after the restart")

    assert [row[0] for row in _shown_events(browser)] == [first, second, during, after]
    assert int(_by_id(browser, "conn-count").text) >= 2
    severe = [
        e
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "/stream" not in e["message"] and "/publish" not in e["message"]
    ]
    assert not severe, severe
