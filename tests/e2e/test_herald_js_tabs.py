"""herald.js in many tabs of one browser (issue 21), in headless Chromium
against the Compose stack's plain HTTP/1.1 front door.

Chromium opens at most 6 connections per host over HTTP/1.1, across all its
tabs, and a stream holds one: without sharing, the seventh tab's stream waits
for a free connection. With sharing (herald.js's default) the tabs elect one
leader (Web Locks) that holds the only stream and relays it to the others
(BroadcastChannel); when the leader's tab is closed another one takes over and
resumes where every tab can go on without a gap or a duplicate; so also
when the leader's renderer crashes, and when its page is frozen (it steps down
at `freeze` and follows again at `resume`).

Each test has a browser of its own, so that no lock, tab or connection of
another is left in it. The server's count of streams on the channel
(`GET /channels/<channel>`, presence) shows how many connections the tabs hold.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.e2e.browser import close_tab, headless_chromium, in_tab, in_tab_async, open_tabs
from tests.e2e.support import Stack, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

TABS = 12
CHROMIUM_CONNECTIONS_PER_HOST = 6

# The demo page imports /herald.js: importing it again takes no request (the
# module map has it), which matters once every connection is taken.
LOAD = """
const done = arguments[arguments.length - 1];
import('/herald.js').then((m) => { window.__herald = m; done(true); }).catch((e) => done(String(e)));
"""

# Subscribes without waiting: a stalled tab must not hold the test up.
SUBSCRIBE = """
const [channels, share] = arguments;
window.__got = []; window.__states = [];
window.__sub = window.__herald.subscribe({
  channels, share,
  onEvent(e) { window.__got.push([e.id, e.data.n, Date.now()]); },  // when it arrived
  onReset(r) { window.__got.push([r.id, 'reset: ' + r.reason]); },
  onState(state) { window.__states.push(state); },
});
"""

# A tab that runs ARM keeps its page busy (its main thread: its messages wait)
# for `ms` once any tab runs GO: a message, as a background tab's timers are slowed.
ARM = """
const ms = arguments[0];
window.__busy = new BroadcastChannel('test:busy');
window.__busy.onmessage = () => { const end = Date.now() + ms; while (Date.now() < end); };
"""
GO = "new BroadcastChannel('test:busy').postMessage('go');"


def tabs_subscribed(browser: Any, stack: Stack, channel: str, share: bool, count: int = TABS) -> list[str]:
    """`count` tabs of the demo page, each subscribed to `channel`: their handles."""
    tabs = open_tabs(browser, stack.url("/"), count)
    for tab in tabs:
        assert in_tab_async(browser, tab, LOAD) is True
    for tab in tabs:
        in_tab(browser, tab, SUBSCRIBE, [channel], share)
    return tabs


def shared_tabs(
    browser: Any, stack: Stack, channel: str, count: int = TABS
) -> tuple[list[str], str, list[str]]:
    """`count` tabs sharing a stream of `channel`, all open: every tab, the leader's, the others."""
    tabs = tabs_subscribed(browser, stack, channel, share=True, count=count)
    wait_until(lambda: all("open" in states(browser, t) for t in tabs), 30, "every tab open")
    (leader,) = leading(browser, tabs)
    return tabs, leader, [t for t in tabs if t != leader]


def got(browser: Any, tab: str) -> list[list[Any]]:
    return list(in_tab(browser, tab, "return window.__got;"))


def states(browser: Any, tab: str) -> list[str]:
    return list(in_tab(browser, tab, "return window.__states;"))


def leading(browser: Any, tabs: list[str]) -> list[str]:
    return [tab for tab in tabs if in_tab(browser, tab, "return window.__sub.leading;")]


def all_have(browser: Any, tabs: list[str], count: int) -> bool:
    return all(len(got(browser, t)) >= count for t in tabs)


def streams_on(stack: Stack, channel: str) -> int:
    """The streams subscribed to `channel` now, over every stream replica."""
    answer = stack.session.get(
        stack.url(f"/channels/{channel}"), headers={"Authorization": f"Bearer {stack.token}"}, timeout=10
    )
    answer.raise_for_status()
    return int(answer.json()["subscribers"])


def assert_every_event_once_in_order(got_rows: list[list[Any]], sent: list[str]) -> None:
    assert [row[0] for row in got_rows] == sent
    assert [row[1] for row in got_rows] == list(range(len(sent)))


def assert_taken_over(browser: Any, stack: Stack, channel: str, tabs: list[str], sent: list[str]) -> None:
    """After the leader went: each of `tabs` gets every event sent, once, in
    order; one of them leads; the server has one stream of the channel."""
    wait_until(lambda: all_have(browser, tabs, len(sent)), 30, "every event in the tabs left")
    for tab in tabs:
        assert_every_event_once_in_order(got(browser, tab), sent)
    assert len(leading(browser, tabs)) == 1
    wait_until(lambda: streams_on(stack, channel) == 1, 15, "one stream on the server")


def test_twelve_tabs_share_one_stream_and_each_gets_every_event_once_in_order(
    stack: Stack, channel: str
) -> None:
    with headless_chromium(script_timeout=30) as browser:
        tabs = tabs_subscribed(browser, stack, channel, share=True)
        wait_until(lambda: all("open" in states(browser, t) for t in tabs), 30, "every tab open")
        assert len(leading(browser, tabs)) == 1
        wait_until(lambda: streams_on(stack, channel) == 1, 15, "the one shared stream on the server")

        sent = [stack.publish(channel, {"n": n}) for n in range(30)]
        wait_until(lambda: all_have(browser, tabs, len(sent)), 30, "the burst in every tab")
        for tab in tabs:
            assert_every_event_once_in_order(got(browser, tab), sent)
        assert streams_on(stack, channel) == 1


def test_without_sharing_the_seventh_tab_stalls_on_chromiums_six_connections(
    stack: Stack, channel: str
) -> None:
    """What sharing removes: with `share: false` each tab opens its own stream,
    and Chromium gives a host no more than 6 connections over HTTP/1.1."""
    with headless_chromium(script_timeout=30) as browser:
        tabs = tabs_subscribed(browser, stack, channel, share=False)
        wait_until(
            lambda: streams_on(stack, channel) == CHROMIUM_CONNECTIONS_PER_HOST,
            20,
            "six streams on the server",
        )
        sent = [stack.publish(channel, {"n": n}) for n in range(30)]

        def complete() -> list[str]:
            return [t for t in tabs if len(got(browser, t)) >= len(sent)]

        wait_until(lambda: len(complete()) >= CHROMIUM_CONNECTIONS_PER_HOST, 20, "the burst in six tabs")
        # A few more seconds: the other tabs' streams are still waiting for a
        # connection, and so get nothing.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert len(complete()) == CHROMIUM_CONNECTIONS_PER_HOST
        served = complete()
        for tab in served:
            assert_every_event_once_in_order(got(browser, tab), sent)
        assert leading(browser, tabs) == tabs  # unshared: each tab runs its own stream
        stalled = [t for t in tabs if t not in served]
        assert len(stalled) == TABS - CHROMIUM_CONNECTIONS_PER_HOST
        for tab in stalled:
            assert got(browser, tab) == [] and "open" not in states(browser, tab)
        assert streams_on(stack, channel) == CHROMIUM_CONNECTIONS_PER_HOST


def test_the_leader_tab_closed_in_the_middle_of_a_burst_loses_nothing(
    stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    with headless_chromium(script_timeout=30) as browser:
        _tabs, leader, others = shared_tabs(browser, stack, channel)
        # Two followers busy when it happens: the next in the lock's queue (the
        # takeover waits for it) and one that answers the new leader's roll
        # call too late to be counted (it checks the stream's position then).
        in_tab(browser, others[0], ARM, 1500)
        in_tab(browser, others[4], ARM, 2500)
        in_tab(browser, others[-1], GO)

        sent = [stack.publish(channel, {"n": n}) for n in range(30)]
        began = time.monotonic()
        close_tab(browser, leader, then=others[-1])  # while the burst is on its way
        sent += [stack.publish(channel, {"n": n}) for n in range(30, 60)]

        wait_until(lambda: all_have(browser, others, len(sent)), 30, "the burst in every tab")
        measurements["herald.js: leader tab closed -> 60 events in 11 tabs, s"] = round(
            time.monotonic() - began, 1
        )
        for tab in others:
            assert_every_event_once_in_order(got(browser, tab), sent)
        assert len(leading(browser, others)) == 1  # another tab took over
        wait_until(lambda: streams_on(stack, channel) == 1, 15, "one stream again on the server")
        # And it goes on: the new leader's stream reaches everyone.
        sent.append(stack.publish(channel, {"n": 60}))
        wait_until(lambda: all_have(browser, others, len(sent)), 15, "the next event")
        for tab in others:
            assert_every_event_once_in_order(got(browser, tab), sent)


def test_a_tab_reloaded_while_events_come_catches_up_and_no_tab_gets_one_twice(
    stack: Stack, channel: str
) -> None:
    """A reloaded tab comes back behind the shared stream (its position is in
    sessionStorage): the leader reconnects from there, and every other tab
    drops the replay."""
    with headless_chromium(script_timeout=30) as browser:
        tabs, _leader, followers = shared_tabs(browser, stack, channel, count=6)
        reloaded = followers[0]
        sent = [stack.publish(channel, {"n": n}) for n in range(20)]
        wait_until(lambda: all_have(browser, tabs, 20), 30, "the first events in every tab")

        browser.switch_to.window(reloaded)
        browser.refresh()
        sent += [stack.publish(channel, {"n": n}) for n in range(20, 40)]  # missed by the reloaded tab
        assert in_tab_async(browser, reloaded, LOAD) is True
        in_tab(browser, reloaded, SUBSCRIBE, [channel], True)
        sent += [stack.publish(channel, {"n": n}) for n in range(40, 60)]

        others = [t for t in tabs if t != reloaded]
        wait_until(lambda: all_have(browser, others, 60), 30, "every event in every other tab")
        wait_until(lambda: len(got(browser, reloaded)) >= 40, 30, "the missed events in the reloaded tab")
        for tab in others:
            assert_every_event_once_in_order(got(browser, tab), sent)
        assert [row[0] for row in got(browser, reloaded)] == sent[20:]
        assert [row[1] for row in got(browser, reloaded)] == list(range(20, 60))


def test_the_leader_tabs_renderer_crashing_in_a_burst_loses_nothing(
    stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    """A crash (the leader's renderer killed, Page.crash) releases its lock as a
    close does: another tab takes over without a gap or a duplicate."""
    with headless_chromium(script_timeout=30) as browser:
        _tabs, leader, others = shared_tabs(browser, stack, channel, count=6)
        sent = [stack.publish(channel, {"n": n}) for n in range(30)]
        browser.switch_to.window(leader)
        with pytest.raises(Exception, match="crashed"):  # selenium: "tab crashed"
            browser.execute_cdp_cmd("Page.crash", {})
        crashed_ms = time.time() * 1000  # the browser's Date.now() reads the same clock
        sent += [stack.publish(channel, {"n": n}) for n in range(30, 60)]

        assert_taken_over(browser, stack, channel, others, sent)
        first_after = max(got(browser, tab)[30][2] for tab in others)
        measurements["herald.js: leader crashed -> next event in all 5 other tabs, ms"] = round(
            first_after - crashed_ms
        )


def test_a_frozen_leader_steps_down_and_catches_up_when_it_resumes(stack: Stack, channel: str) -> None:
    """A frozen page runs nothing (Page Lifecycle; Chromium freezes background
    tabs): the leader hands the stream on at `freeze`, so the other tabs go on,
    and at `resume` it follows, catching up on what it missed, once each."""
    with headless_chromium(script_timeout=30) as browser:
        tabs, leader, others = shared_tabs(browser, stack, channel, count=6)
        sent = [stack.publish(channel, {"n": n}) for n in range(10)]
        wait_until(lambda: all_have(browser, tabs, len(sent)), 30, "the first events in every tab")

        browser.switch_to.window(leader)
        browser.execute_cdp_cmd("Page.setWebLifecycleState", {"state": "frozen"})
        sent += [stack.publish(channel, {"n": n}) for n in range(10, 30)]
        # No script runs in the frozen tab: ask only the others. One stream on
        # the server: the frozen tab's was closed.
        assert_taken_over(browser, stack, channel, others, sent)

        browser.switch_to.window(leader)
        browser.execute_cdp_cmd("Page.setWebLifecycleState", {"state": "active"})
        sent += [stack.publish(channel, {"n": n}) for n in range(30, 40)]
        wait_until(
            lambda: all_have(browser, tabs, len(sent)), 30, "every event in every tab, the resumed one too"
        )
        for tab in tabs:
            assert_every_event_once_in_order(got(browser, tab), sent)
        assert leading(browser, tabs) != [leader] and len(leading(browser, tabs)) == 1
        assert streams_on(stack, channel) == 1


# Hides one of the APIs sharing needs, as an insecure context (no
# navigator.locks) or an old browser (no BroadcastChannel) lacks it.
HIDE = """
const api = arguments[0];
if (api === 'locks') Object.defineProperty(Navigator.prototype, 'locks', { get: () => undefined });
else delete window.BroadcastChannel;
"""


def test_without_web_locks_or_broadcastchannel_each_tab_has_its_own_stream(
    stack: Stack, channel: str
) -> None:
    with headless_chromium(script_timeout=30) as browser:
        tabs = open_tabs(browser, stack.url("/"), 4)
        for tab, hidden in zip(tabs, ("locks", "locks", "BroadcastChannel", "BroadcastChannel"), strict=True):
            assert in_tab_async(browser, tab, LOAD) is True
            in_tab(browser, tab, HIDE, hidden)
            in_tab(browser, tab, SUBSCRIBE, [channel], True)  # sharing asked for, not possible
        wait_until(lambda: all("open" in states(browser, t) for t in tabs), 30, "every tab open")
        assert leading(browser, tabs) == tabs
        wait_until(lambda: streams_on(stack, channel) == len(tabs), 15, "a stream per tab on the server")
        sent = [stack.publish(channel, {"n": n}) for n in range(10)]
        wait_until(lambda: all_have(browser, tabs, len(sent)), 30, "the events in every tab")
        for tab in tabs:
            assert_every_event_once_in_order(got(browser, tab), sent)
