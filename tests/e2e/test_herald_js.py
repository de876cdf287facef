"""/herald.js, Herald's browser client, in headless Chromium against the Compose
stack: every event exactly once and in order, across a restart of every stream
replica and across a page reload in the middle of a burst."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.browser import headless_chromium
from tests.e2e.support import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

# Loads /herald.js into the page and subscribes. What onEvent gets is kept in
# sessionStorage too, so that it survives a reload (as herald.js's own resume
# point does): the test reads the whole record at the end.
SUBSCRIBE = """
const [channels, done] = [arguments[0], arguments[arguments.length - 1]];
import('/herald.js').then(({ subscribe }) => {
  const record = JSON.parse(sessionStorage.getItem('test:got') || '[]');
  const keep = (row) => { record.push(row); sessionStorage.setItem('test:got', JSON.stringify(record)); };
  window.__states = [];
  window.__sub = subscribe({
    channels,
    onEvent(e) { keep([e.id, e.channel, e.event, e.data]); },
    onReset(r) { keep([r.id, null, 'reset', r.reason]); },
    onState(state) { window.__states.push(state); if (state === 'open') done(true); },
  });
}).catch((e) => done(String(e)));
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium(script_timeout=30) as driver:
        yield driver


def fresh_page(stack: Stack, browser: Any) -> None:
    browser.get(stack.url("/"))
    browser.execute_script("sessionStorage.clear();")


def record(browser: Any) -> list[list[Any]]:
    return list(browser.execute_script("return JSON.parse(sessionStorage.getItem('test:got') || '[]');"))


def subscribe(browser: Any, channels: list[str]) -> None:
    assert browser.execute_async_script(SUBSCRIBE, channels) is True


def test_herald_js_is_served_as_a_javascript_module(stack: Stack) -> None:
    answer = stack.session.get(stack.url("/herald.js"), timeout=10)
    assert answer.status_code == 200
    assert "javascript" in answer.headers["Content-Type"]
    assert "export function subscribe" in answer.text


def test_every_event_once_in_order_across_a_restart_of_every_replica(
    stack: Stack, browser: Any, channel: str
) -> None:
    fresh_page(stack, browser)
    a, b = channel + ".a", channel + ".b"
    subscribe(browser, [a, b])
    sent = [(stack.publish(c, {"n": n}), c) for n in range(10) for c in (a, b)]
    stack.compose("restart", "stream-service", timeout=120)
    sent += [(stack.publish(c, {"n": n}), c) for n in range(10, 20) for c in (a, b)]
    wait_until(lambda: len(record(browser)) >= len(sent), 60, "every event in the page", 0.2)
    got = record(browser)
    assert [(r[1], r[3]["n"]) for r in got] == [(c, n) for n in range(20) for c in (a, b)]
    assert len({r[0] for r in got}) == len(got)  # never the same id twice
    browser.execute_script("window.__sub.close();")


def test_every_event_once_across_a_reload_in_the_middle_of_a_burst(
    stack: Stack, browser: Any, channel: str
) -> None:
    fresh_page(stack, browser)
    subscribe(browser, [channel])
    sent: list[str] = []

    def burst() -> None:
        for n in range(60):
            sent.append(stack.publish(channel, {"n": n}))
            time.sleep(0.02)

    publisher = threading.Thread(target=burst)
    publisher.start()
    wait_until(lambda: len(record(browser)) >= 15, 30, "part of the burst")
    browser.refresh()  # sessionStorage survives: herald.js resumes from its last id
    subscribe(browser, [channel])
    publisher.join(60)
    wait_until(lambda: len(record(browser)) >= 60, 60, "the whole burst", 0.2)
    got = record(browser)
    assert [r[0] for r in got] == sent
    assert [r[3]["n"] for r in got] == list(range(60))
    browser.execute_script("window.__sub.close();")


def test_a_stale_position_is_a_reset_then_every_new_event(stack: Stack, browser: Any, channel: str) -> None:
    fresh_page(stack, browser)
    # A position from another epoch, as after Redis lost its data: the resume point herald.js keeps.
    browser.execute_script(
        "sessionStorage.setItem(arguments[0], 'ffffffffffff-7');", f"herald:last:/stream:{channel}"
    )
    subscribe(browser, [channel])
    wait_until(lambda: len(record(browser)) >= 1, 15, "the reset")
    (reset,) = record(browser)
    assert reset[2] == "reset" and reset[3] == "epoch_changed"
    ids = [stack.publish(channel, {"n": n}) for n in range(5)]
    wait_until(lambda: len(record(browser)) >= 6, 15, "the events after the reset")
    assert [r[0] for r in record(browser)[1:]] == ids
    browser.execute_script("window.__sub.close();")


TOKENS = """
const [channels, tokens, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
import('/herald.js').then(({ subscribe }) => {
  const record = [];
  window.__got = record;
  window.__tokens = 0;
  window.__sub = subscribe({
    channels,
    token: async () => tokens[Math.min(window.__tokens++, tokens.length - 1)],
    onEvent(e) { record.push([e.id, e.channel, e.event, e.data]); },
    onState(state) { if (state === 'open' && window.__tokens === 1) done(true); },
  });
}).catch((e) => done(String(e)));
"""


def test_an_expiring_token_is_refreshed_without_losing_an_event(
    stack: Stack, browser: Any, channel: str
) -> None:
    import jwt

    private = "private-" + channel
    now = time.time()
    # Each token lives 4 s more than the one before: herald.js asks for the next
    # one when half the current one's life is gone, and resumes from its last id.
    secret = stack.settings["SUBSCRIBE_SECRET"]
    tokens = [
        jwt.encode({"channels": [private], "exp": int(now + 6 + 4 * i)}, secret, algorithm="HS256")
        for i in range(10)
    ]
    fresh_page(stack, browser)
    assert browser.execute_async_script(TOKENS, [private], tokens) is True
    sent: list[str] = []
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        sent.append(stack.publish(private, {"n": len(sent)}))
        time.sleep(0.1)
    wait_until(lambda: len(browser.execute_script("return window.__got;")) >= len(sent), 30, "every event")
    got = browser.execute_script("return window.__got;")
    assert [r[0] for r in got] == sent
    assert browser.execute_script("return window.__tokens;") >= 3  # refreshed, more than once
    browser.execute_script("window.__sub.close();")


def test_the_readmes_browser_snippet_runs_as_written(stack: Stack, browser: Any, channel: str) -> None:
    from tests.e2e.support import ROOT

    readme = (ROOT / "README.md").read_text().split("### From a browser", 1)[1]
    snippet = readme.split("```js\n", 1)[1].split("```", 1)[0]
    importing = 'import { subscribe } from "/herald.js";\n'
    assert snippet.startswith(importing)
    # The one change: a static import cannot run inside WebDriver's script, a dynamic one can.
    ours = f'["{channel}.orders", "{channel}.audit"]'
    body = snippet[len(importing) :].replace('["orders", "audit"]', ours)
    fresh_page(stack, browser)
    browser.get_log("browser")  # drop what came before
    script = (
        "const done = arguments[arguments.length - 1];"
        'import("/herald.js").then(({ subscribe }) => {' + body + "window.__readme = sub; done(true); });"
    )
    assert browser.execute_async_script(script) is True
    time.sleep(1)  # the stream opens
    sent = stack.publish(channel + ".orders", {"id": 17}, event="created")

    lines: list[str] = []

    def logged() -> bool:
        lines.extend(e["message"] for e in browser.get_log("browser"))  # each entry is read once
        return any(sent in m for m in lines)

    wait_until(logged, 15, "the logged event")
    line = next(m for m in lines if sent in m)
    assert f"{channel}.orders" in line and "created" in line
    browser.execute_script("window.__readme.close();")
