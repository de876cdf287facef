"""herald.js from a page on another origin (issue 16, items 7 and 8), in headless
Chromium against the Compose stack: the subscribe token travels in the
Authorization header and the resume point in Last-Event-ID, which takes a CORS
preflight the stream service answers for CORS_ALLOWED_ORIGINS only. Also
herald.js's own rules: a Retry-After is bounded (5 minutes) and parsed
strictly, and an exception thrown by onEvent loses no event.

The second origin is a small http.server on another loopback port, serving a
blank page and its own copy of herald.js (as an integrator's site would).
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests

from tests.e2e.browser import headless_chromium
from tests.e2e.conftest import CROSS_ORIGIN, CROSS_ORIGIN_PORT
from tests.e2e.support import ROOT, Stack, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

HERALD_JS = (ROOT / "clients/js/herald.js").read_bytes()
PAGE = b"<!doctype html><html><head><title>another site</title></head><body></body></html>"


class Site(http.server.ThreadingHTTPServer):
    """A page, its copy of herald.js, and /busy: a 503 with whatever Retry-After
    the test sets, counting its hits."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        self.busy_hits = 0
        self.retry_after = "1"
        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Site

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/busy":
            self.server.busy_hits += 1
            body = b'{"error":"unavailable","message":"busy"}'
            self.reply(503, "application/json", body, {"Retry-After": self.server.retry_after})
        elif path == "/herald.js":
            self.reply(200, "text/javascript", HERALD_JS)
        elif path == "/":
            self.reply(200, "text/html", PAGE)
        else:
            self.reply(404, "text/plain", b"no")

    def reply(self, status: int, kind: str, body: bytes, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The allowed second origin (listed in the stack's CORS_ALLOWED_ORIGINS)."""
    server = Site(CROSS_ORIGIN_PORT)
    assert server.origin == CROSS_ORIGIN
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stranger() -> Iterator[Site]:
    """A third origin, not allowed."""
    server = Site(free_port())
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium(script_timeout=40) as driver:
        yield driver


# Subscribes with the page's own herald.js; resolves on the first 'open',
# 'waiting' or 'failed' state. Every onEvent, onError and state is recorded.
SUBSCRIBE = """
const [url, channels, jwt, throwOn, done] = arguments;
import('/herald.js').then(({ subscribe }) => {
  window.__got = []; window.__errors = []; window.__states = [];
  const options = {
    url, channels,
    onEvent(e) {
      window.__got.push([e.id, e.channel, e.event, e.data]);
      if (throwOn !== null && e.data && e.data.n === throwOn) throw new Error('the app failed on ' + throwOn);
    },
    onError(err, e) { window.__errors.push([String(err.message), e.id, e.data]); },
    onState(state, info) {
      window.__states.push([state, info || {}]);
      if (state !== 'closed') done(state);
    },
  };
  if (jwt) options.token = async () => jwt;
  window.__sub = subscribe(options);
}).catch((e) => done(String(e)));
"""


def open_page(browser: Any, origin: str) -> None:
    browser.get(origin + "/")
    browser.execute_script("sessionStorage.clear();")


def subscribe(
    browser: Any, url: str, channels: list[str], token: str | None, throw_on: int | None = None
) -> str:
    return str(browser.execute_async_script(SUBSCRIBE, url, channels, token, throw_on))


def got(browser: Any) -> list[list[Any]]:
    return list(browser.execute_script("return window.__got;"))


def nginx_lines(stack: Stack, needle: str) -> list[str]:
    return [line for line in stack.nginx_log() if needle in line]


def token_for(stack: Stack, channel: str) -> str:
    claims = {"channels": [channel], "exp": int(time.time()) + 600}
    return jwt.encode(claims, stack.settings["SUBSCRIBE_SECRET"], algorithm="HS256")


def test_a_private_channel_from_another_origin_with_the_token_in_a_header(
    stack: Stack, browser: Any, site: Site, channel: str
) -> None:
    private = "private-" + channel
    open_page(browser, site.origin)
    assert subscribe(browser, stack.url("/stream"), [private], token_for(stack, private)) == "open"
    sent = [stack.publish(private, {"n": n}) for n in range(5)]
    wait_until(lambda: len(got(browser)) >= 5, 20, "the private events on the other origin")
    assert [r[0] for r in got(browser)] == sent
    assert [r[3]["n"] for r in got(browser)] == list(range(5))
    browser.execute_script("window.__sub.close();")

    # Missed while closed: the next subscription resumes with a Last-Event-ID header.
    missed = [stack.publish(private, {"n": n}) for n in range(5, 8)]
    assert subscribe(browser, stack.url("/stream"), [private], token_for(stack, private)) == "open"
    wait_until(lambda: len(got(browser)) >= 3, 20, "the missed events, resumed cross-origin")
    assert [r[0] for r in got(browser)] == missed
    browser.execute_script("window.__sub.close();")

    # The browser asked first (the preflight, answered 204), then sent the token
    # in a header: never in the URL.
    def logged() -> list[str]:
        lines = nginx_lines(stack, f"channel={private}")
        return lines if any('"GET ' in line for line in lines) else []

    lines = wait_until(logged, 10, "nginx's access log of the streams")
    preflights = [line for line in lines if '"OPTIONS /stream' in line]
    assert preflights and all('" 204 ' in line for line in preflights), lines
    assert not any("token=" in line for line in lines), lines


def test_an_origin_not_allowed_gets_no_events(
    stack: Stack, browser: Any, stranger: Site, channel: str
) -> None:
    private = "private-" + channel
    open_page(browser, stranger.origin)
    # The preflight is refused: to the page, a network error (no status), and it backs off.
    assert subscribe(browser, stack.url("/stream"), [private], token_for(stack, private)) == "waiting"
    state, info = browser.execute_script("return window.__states[0];")
    assert (state, info["status"]) == ("waiting", None)
    stack.publish(private, {"n": 1})
    time.sleep(1)
    assert got(browser) == []
    browser.execute_script("window.__sub.close();")
    lines = wait_until(lambda: nginx_lines(stack, f"channel={private}"), 10, "the refused preflight")
    assert any('"OPTIONS /stream' in line and '" 403 ' in line for line in lines), lines
    assert not any('"GET /stream' in line for line in lines), lines


@pytest.mark.parametrize("retry_after", ["99999999999", "31536000", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_huge_retry_after_is_bounded_and_never_a_tight_loop(
    browser: Any, site: Site, retry_after: str
) -> None:
    """A proxy's Retry-After above 2^31 ms used to overflow setTimeout into 0 ms."""
    open_page(browser, site.origin)
    site.retry_after, site.busy_hits = retry_after, 0
    assert subscribe(browser, site.origin + "/busy", ["x"], None) == "waiting"
    time.sleep(2)
    state, info = browser.execute_script("return window.__states[0];")
    browser.execute_script("window.__sub.close();")
    assert state == "waiting" and info["status"] == 503
    assert 299_000 <= info["delay"] <= 300_250, info  # at most 5 minutes (plus jitter)
    assert site.busy_hits == 1


def test_retry_after_is_parsed_strictly(browser: Any, site: Site) -> None:
    open_page(browser, site.origin)
    values = ["0", "7", " 12 ", "301", "99999999999", "²", "٣", "-1", "1.5", "1e3", "soon", ""]
    script = (
        "const [values, done] = arguments;"
        "import('/herald.js').then((m) => done(values.map((v) => m.retryAfterMs(v))));"
    )
    got_ms = browser.execute_async_script(script, values)
    assert got_ms == [0, 7000, 12000, 300000, 300000, None, None, None, None, None, None, None]
    dated = browser.execute_async_script(
        "const done = arguments[0];"
        "import('/herald.js').then((m) => done(m.retryAfterMs('Wed, 21 Oct 2015 07:28:30 GMT', "
        "Date.parse('Wed, 21 Oct 2015 07:28:00 GMT'))));"
    )
    assert dated == 30000


def test_an_exception_in_on_event_goes_to_on_error_and_loses_nothing(
    stack: Stack, browser: Any, channel: str
) -> None:
    open_page(browser, stack.base_url)
    assert subscribe(browser, "/stream", [channel], None, throw_on=2) == "open"
    sent = [stack.publish(channel, {"n": n}) for n in range(5)]
    wait_until(lambda: len(got(browser)) >= 5, 20, "every event")
    time.sleep(0.5)
    # Every event reached onEvent once, in order; the one it threw on went to
    # onError with the error; the stream stayed open (no reconnect, no replay).
    assert [r[0] for r in got(browser)] == sent
    errors = browser.execute_script("return window.__errors;")
    assert errors == [["the app failed on 2", sent[2], {"n": 2}]]
    states = [s[0] for s in browser.execute_script("return window.__states;")]
    assert states == ["open"]
    browser.execute_script("window.__sub.close();")


def test_nginx_own_errors_are_readable_from_an_allowed_origin(stack: Stack, browser: Any, site: Site) -> None:
    """nginx's JSON errors (here a 404 it answers itself) carry the same CORS
    headers as the services' answers, so a page on an allowed origin reads them
    and their Retry-After; other origins get none."""
    allowed = requests.get(stack.url("/no-such-path"), headers={"Origin": CROSS_ORIGIN}, timeout=10)
    assert allowed.status_code == 404 and allowed.json()["error"] == "not_found"
    assert allowed.headers["Access-Control-Allow-Origin"] == CROSS_ORIGIN
    assert allowed.headers["Access-Control-Allow-Credentials"] == "true"
    assert allowed.headers["Access-Control-Expose-Headers"] == "Retry-After"
    other = requests.get(stack.url("/no-such-path"), headers={"Origin": "http://evil.example"}, timeout=10)
    assert other.status_code == 404 and "Access-Control-Allow-Origin" not in other.headers
    # From the page itself: without the headers fetch() would reject (a network error).
    open_page(browser, site.origin)
    script = (
        "const [url, done] = arguments;"
        "fetch(url).then(async (r) => done([r.status, (await r.json()).error]), (e) => done(String(e)));"
    )
    assert browser.execute_async_script(script, stack.url("/no-such-path")) == [404, "not_found"]
