"""HTTPS with HTTP/2 at the front door (docs/tls.md), on the tls_stack
(conftest.TLS_SETTINGS: a certificate from scripts/dev-cert.sh, the redirect from
plain HTTP on, STREAMS_PER_IP=12).

- `curl --http2` streams through TLS: HTTP/2, every event the moment it is
  published while the stream stays open, heartbeats, resume with Last-Event-ID;
- headless Chromium (trusting the certificate by its key's hash, for this test
  only) runs 12 streams on one origin in one page, twice the 6 connections
  HTTP/1.1 allows, and all get the event; the browser and nginx both say h2;
- plain HTTP is redirected (308) to HTTPS, but for the health check, and HTTPS
  answers carry HSTS;
- nginx's JSON errors over HTTP/2, and STREAMS_PER_IP counting streams: of 13
  streams on ONE HTTP/2 connection, 12 open and the 13th gets the JSON 429.
- what nginx passes but gunicorn refuses (too many or too large header
  fields) is the services' JSON 431, over both protocols.

Needs curl with HTTP/2 (Debian's has it), openssl, and for the browser test
Debian's chromium and chromium-driver (tests/e2e/browser.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.browser import headless_chromium
from tests.e2e.support import Stack, wait_until
from tests.support.docker import in_ci
from tests.support.sse import Frame, SSEParser

pytestmark = pytest.mark.e2e

STREAMS_PER_IP = 12  # conftest.TLS_SETTINGS


def tls_port(stack: Stack) -> int:
    return int(stack.settings["HERALD_TLS_PORT"])


def https(stack: Stack, path: str) -> str:
    """A URL of the stack over TLS (the certificate names 127.0.0.1 and localhost)."""
    return f"https://127.0.0.1:{tls_port(stack)}{path}"


def ca_file(stack: Stack) -> str:
    """The local CA that signed the stack's certificate (scripts/dev-cert.sh)."""
    return str(Path(stack.settings["TLS_CERT_FILE"]).with_name("ca.pem"))


def client_address() -> str:
    """Another client address (X-Forwarded-For, which nginx believes from the
    Docker networks: REAL_IP_FROM), so that each test has its own STREAMS_PER_IP."""
    return f"198.51.100.{secrets.randbelow(250) + 1}"


def curl() -> str:
    """curl with HTTP/2, or a skip (a failure in CI)."""
    found = shutil.which("curl")
    problem = None
    if found is None:
        problem = "curl is not installed"
    else:
        features = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
        if "HTTP2" not in features:
            problem = "this curl has no HTTP/2 (nghttp2)"
    if problem:
        if in_ci():
            pytest.fail(problem + " (CI must provide it)", pytrace=False)
        pytest.skip(problem)
    assert found
    return found


def publish(stack: Stack, channel: str, data: Any, event: str = "message") -> str:
    """Publish one event over HTTPS (retrying 429/502/503 briefly); return its id."""
    deadline = time.monotonic() + 15
    while True:
        answer = requests.post(
            https(stack, "/publish"),
            json={"channel": channel, "event": event, "data": data},
            headers={"Authorization": f"Bearer {stack.token}"},
            verify=ca_file(stack),
            timeout=10,
        )
        if answer.status_code == 202:
            return str(answer.json()["id"])
        if answer.status_code not in (429, 502, 503, 504) or time.monotonic() > deadline:
            raise AssertionError(f"publish failed: {answer.status_code} {answer.text}")
        time.sleep(0.2)


class CurlStream:
    """`curl --http2 -N` reading one stream through TLS, parsed as it arrives
    (frames with their arrival time); curl's -v output kept (the protocol)."""

    def __init__(self, stack: Stack, path: str, *headers: str) -> None:
        args = [curl(), "--http2", "--cacert", ca_file(stack), "-N", "-sS", "-v", "--max-time", "120"]
        for header in ("Accept: text/event-stream", *headers):
            args += ["-H", header]
        self.process = subprocess.Popen(
            [*args, https(stack, path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.frames: list[Frame] = []
        self.verbose = b""
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_frames, daemon=True),
            threading.Thread(target=self._read_verbose, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_frames(self) -> None:
        assert self.process.stdout is not None
        parser = SSEParser()
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 65536):
            frames = parser.feed(chunk)
            with self._lock:
                self.frames += frames

    def _read_verbose(self) -> None:
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                self.verbose += chunk

    def wait_for(self, check: Callable[[Frame], bool], timeout: float, what: str) -> Frame:
        def found() -> Frame | None:
            with self._lock:
                return next((frame for frame in self.frames if check(frame)), None)

        frame: Frame = wait_until(found, timeout, what, 0.02)
        return frame

    def headers(self) -> list[str]:
        """The response's status line and headers, as curl -v shows them (`< `)."""
        with self._lock:
            text = self.verbose.decode(errors="replace")
        return [line[2:].strip() for line in text.splitlines() if line.startswith("< ")]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=10)


def carries(event_id: str) -> Callable[[Frame], bool]:
    """Whether a frame dispatches the event of this id."""
    return lambda frame: frame.event is not None and frame.event.id == event_id


@pytest.fixture
def curl_streams() -> Iterator[list[CurlStream]]:
    """Streams a test opens, all closed at its end."""
    opened: list[CurlStream] = []
    yield opened
    for stream in opened:
        stream.close()


def test_curl_streams_over_http2_with_nothing_buffered(
    tls_stack: Stack, channel: str, curl_streams: list[CurlStream], measurements: dict[str, Any]
) -> None:
    stream = CurlStream(tls_stack, f"/stream?channel={channel}", f"X-Forwarded-For: {client_address()}")
    curl_streams.append(stream)
    stream.wait_for(lambda f: "retry" in f.fields, 15, "the stream's preamble")
    headers = stream.headers()
    assert headers[0] == "HTTP/2 200", headers
    assert any(h.lower().startswith("content-type: text/event-stream") for h in headers), headers
    assert (
        b"ALPN: server accepted h2" in stream.verbose or b"ALPN, server accepted to use h2" in stream.verbose
    )

    # Published after the stream opened: each event arrives at once, on the
    # same open connection (nothing waits in a buffer for more bytes).
    latencies = []
    for n in range(3):
        time.sleep(0.3)
        sent = time.monotonic()
        event_id = publish(tls_stack, channel, {"n": n}, event="tick")
        frame = stream.wait_for(carries(event_id), 5, "the event")
        latencies.append(frame.at - sent)
        assert frame.event is not None and frame.event.json() == {"n": n} and frame.event.event == "tick"
        assert stream.process.poll() is None, "the stream ended"
    measurements["tls: curl --http2, publish -> event (max of 3), ms"] = round(max(latencies) * 1000)
    assert max(latencies) < 1.0, latencies

    # Idle, the stream gets its heartbeats (HEARTBEAT_SECONDS=2) through TLS too.
    idle_from = time.monotonic()
    stream.wait_for(lambda f: "hb" in f.comments and f.at > idle_from, 6, "a heartbeat")
    assert stream.process.poll() is None


def test_a_stream_resumes_over_http2(tls_stack: Stack, channel: str, curl_streams: list[CurlStream]) -> None:
    first = publish(tls_stack, channel, {"n": 1})
    second = publish(tls_stack, channel, {"n": 2})
    stream = CurlStream(
        tls_stack,
        f"/stream?channel={channel}",
        f"Last-Event-ID: {first}",
        f"X-Forwarded-For: {client_address()}",
    )
    curl_streams.append(stream)
    frame = stream.wait_for(lambda f: f.event is not None, 15, "the missed event")
    assert frame.event is not None and frame.event.id == second and frame.event.json() == {"n": 2}


def spki_hash(cert: str) -> str:
    """base64 SHA-256 of the certificate's public key: Chromium's
    --ignore-certificate-errors-spki-list trusts that key, and nothing else."""
    pem = subprocess.run(
        ["openssl", "x509", "-in", cert, "-noout", "-pubkey"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pem, capture_output=True, check=True
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


# 12 streams of one channel in one page, each a fetch() read as it arrives
# (distinct URLs: &tab=<n>, which /stream ignores); `live` counts those past
# their preamble (subscribed), `ids[n]` the event ids stream n received.
OPEN_STREAMS = """
const [channel, count] = arguments;
const state = window.heraldTest = {live: 0, ids: [], statuses: [], errors: [], stop: new AbortController()};
for (let n = 0; n < count; n++) {
  state.ids.push([]);
  (async () => {
    const url = '/stream?channel=' + encodeURIComponent(channel) + '&tab=' + n;
    const response = await fetch(url, {signal: state.stop.signal, headers: {Accept: 'text/event-stream'}});
    state.statuses.push(response.status);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let text = '', live = false;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
      const frames = text.split('\\n\\n');
      text = frames.pop();
      for (const frame of frames) {
        if (!live && /^retry:/m.test(frame)) { live = true; state.live++; }
        const id = /^id: (.*)$/m.exec(frame);
        if (id && /^data:/m.test(frame)) state.ids[n].push(id[1]);
      }
    }
  })().catch(e => { if (e.name !== 'AbortError') state.errors.push(String(e)); });
}
"""


@pytest.mark.browser
def test_chromium_runs_12_streams_on_one_origin_over_http2(
    tls_stack: Stack, channel: str, measurements: dict[str, Any]
) -> None:
    spki = spki_hash(tls_stack.settings["TLS_CERT_FILE"])
    with headless_chromium(f"--ignore-certificate-errors-spki-list={spki}", script_timeout=30) as browser:
        browser.get(https(tls_stack, "/healthz"))
        protocol = browser.execute_script(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
        )
        assert protocol == "h2"

        browser.execute_script(OPEN_STREAMS, channel, 12)

        def state() -> dict[str, Any]:
            result: dict[str, Any] = browser.execute_script("return window.heraldTest")
            assert not result["errors"], result["errors"]
            return result

        # All 12 at once: over HTTP/1.1 Chromium would hold 6 connections to
        # this origin and queue the other 6 streams until one of those ended.
        began = time.monotonic()
        wait_until(lambda: state()["live"] == 12, 20, "12 live streams in the page")
        measurements["tls: 12 streams live in Chromium, s"] = round(time.monotonic() - began, 2)
        assert state()["statuses"] == [200] * 12
        # And the page's other requests still get through beside them.
        status = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/healthz').then(r => done(r.status), e => done(String(e)));"
        )
        assert status == 200

        event_id = publish(tls_stack, channel, {"to": "every tab"})
        wait_until(lambda: state()["ids"] == [[event_id]] * 12, 10, "the event in all 12 streams", 0.05)

        # A resource's timing is recorded when it ends: close the streams, then
        # every one of them says it went over HTTP/2.
        browser.execute_script("window.heraldTest.stop.abort()")

        def stream_protocols() -> list[str] | None:
            protocols: list[str] = browser.execute_script(
                "return performance.getEntriesByType('resource')"
                ".filter(e => new URL(e.name).pathname === '/stream').map(e => e.nextHopProtocol)"
            )
            return protocols if len(protocols) == 12 else None

        assert wait_until(stream_protocols, 10, "12 resource timings of /stream") == ["h2"] * 12

    # nginx's side: 12 streams of this channel, each logged as HTTP/2.0.
    def logged() -> list[str] | None:
        lines = [line for line in tls_stack.nginx_log() if f"channel={channel}&tab=" in line]
        return lines if len(lines) == 12 else None

    lines = wait_until(logged, 15, "nginx's access log of the 12 streams", 0.5)
    assert all(' HTTP/2.0" 200 ' in line for line in lines), lines


def test_plain_http_is_redirected_to_https_with_hsts(tls_stack: Stack, channel: str) -> None:
    port = tls_port(tls_stack)
    stream = requests.get(
        tls_stack.url(f"/stream?channel={channel}"), allow_redirects=False, stream=True, timeout=10
    )
    assert stream.status_code == 308, (stream.status_code, stream.text[:300])
    assert stream.headers["Location"] == f"https://127.0.0.1:{port}/stream?channel={channel}"
    assert "Strict-Transport-Security" not in stream.headers  # never over plain HTTP
    # 308, not 301: a POST stays a POST (its token was sent in the clear,
    # though: publishers should be given the https URL).
    posted = requests.post(tls_stack.url("/publish"), json={}, allow_redirects=False, timeout=10)
    assert posted.status_code == 308
    assert posted.headers["Location"] == f"https://127.0.0.1:{port}/publish"
    # The health check (compose.yaml asks nginx on port 80) is not redirected.
    health = requests.get(tls_stack.url("/healthz"), allow_redirects=False, timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    # Followed, the redirect ends at the same answer over HTTPS.
    page = requests.get(tls_stack.url("/"), verify=ca_file(tls_stack), timeout=10)
    assert page.status_code == 200 and page.url == f"https://127.0.0.1:{port}/"

    # HSTS on HTTPS answers: nginx's own, the demo page, nginx's JSON errors.
    for path, status in (("/healthz", 200), ("/", 200), ("/nope", 404)):
        answer = requests.get(https(tls_stack, path), verify=ca_file(tls_stack), timeout=10)
        assert answer.status_code == status, path
        assert answer.headers.get("Strict-Transport-Security") == "max-age=63072000", (path, answer.headers)


def curl_once(stack: Stack, path: str, *args: str) -> tuple[int, str, str]:
    """One request with `curl --http2` over TLS: status, HTTP version, body."""
    result = subprocess.run(
        [curl(), "--http2", "--cacert", ca_file(stack), "-sS", "--max-time", "10",
         "-w", "\\n%{http_code} %{http_version}", *args, https(stack, path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body, _, last = result.stdout.rpartition("\n")
    status, version = last.split()
    return int(status), version, body


def assert_json_error(body: str, code: str) -> None:
    parsed = json.loads(body)
    assert set(parsed) == {"error", "message"} and parsed["error"] == code, parsed


def test_json_errors_and_the_streams_per_address_limit_over_http2(
    tls_stack: Stack, channel: str, tmp_path: Path
) -> None:
    # nginx's own errors are JSON over HTTP/2 as over HTTP/1.1.
    status, version, body = curl_once(tls_stack, "/nope")
    assert (status, version) == (404, "2")
    assert_json_error(body, "not_found")
    status, version, body = curl_once(tls_stack, "/", "-X", "DELETE")
    assert (status, version) == (405, "2")
    assert_json_error(body, "method_not_allowed")
    # Too long for the services: nginx's JSON 414, also for a URI that HPACK
    # shrinks below nginx's own buffers (9,000 letters a: ~5,600 bytes).
    for length in (5000, 9000):
        status, version, body = curl_once(tls_stack, "/stream?channel=" + "a" * length)
        assert (status, version) == (414, "2"), length
        assert_json_error(body, "uri_too_long")

    # STREAMS_PER_IP + 1 streams from one client on ONE HTTP/2 connection
    # (curl --parallel multiplexes them): the limit counts streams, so 12 open
    # and one gets nginx's JSON 429. They run 6 s, then curl closes them all.
    address = client_address()
    args = [curl(), "--http2", "--cacert", ca_file(tls_stack), "-sS", "--no-progress-meter", "-N",
            "--parallel", "--parallel-max", "50", "--max-time", "6", "-H", f"X-Forwarded-For: {address}",
            "-w", "%{http_code} %{http_version} %{num_connects} %{filename_effective}\\n"]  # fmt: skip
    for n in range(STREAMS_PER_IP + 1):
        args += [https(tls_stack, f"/stream?channel={channel}&n={n}"), "-o", str(tmp_path / f"stream-{n}")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    transfers = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert len(transfers) == STREAMS_PER_IP + 1, (result.stdout, result.stderr)
    assert sorted(int(t[0]) for t in transfers) == [200] * STREAMS_PER_IP + [429], transfers
    assert {t[1] for t in transfers} == {"2"}
    assert sum(int(t[2]) for t in transfers) == 1, "not one connection"
    refused = next(t for t in transfers if t[0] == "429")
    assert_json_error(Path(refused[3]).read_text(), "too_many_streams")
    # The open ones streamed (preamble and position) until curl stopped them.
    for t in transfers:
        if t[0] == "200":
            assert "retry:" in Path(t[3]).read_text()

    # Their ends freed the address's streams: it may open one again.
    again = CurlStream(tls_stack, f"/stream?channel={channel}", f"X-Forwarded-For: {address}")
    try:
        again.wait_for(
            lambda f: "retry" in f.fields, 15, "a stream from the same address after the others ended"
        )
        assert again.headers()[0] == "HTTP/2 200"
    finally:
        again.close()


def test_what_gunicorn_refuses_behind_nginx_is_json_too(tls_stack: Stack, channel: str) -> None:
    """Requests nginx lets through but gunicorn refuses before the app (more
    than its 100 header fields; over HTTP/2 a field over its 8190 bytes, which
    nginx measures HPACK-compressed) get the services' JSON error, not
    gunicorn's HTML page, from both services, over both protocols."""
    many = [arg for n in range(150) for arg in ("-H", f"X-Extra-{n}: v")]
    big = ["-H", "X-Big: " + "a" * 10000]  # ~6,250 bytes compressed: under nginx's 8k
    targets: tuple[tuple[str, list[str]], ...] = (
        (f"/stream?channel={channel}", []),
        (f"/history?channel={channel}", []),
        ("/publish", ["-X", "POST"]),
    )
    for path, method in targets:
        for protocol, headers, expected in (
            ("--http2", many, (431, "2", "header_too_large")),
            ("--http1.1", many, (431, "1.1", "header_too_large")),
            ("--http2", big, (431, "2", "header_too_large")),
            # Over HTTP/1.1 nginx measures it as sent: its own JSON 400.
            ("--http1.1", big, (400, "1.1", "header_too_large")),
        ):
            status, version, body = curl_once(tls_stack, path, protocol, *method, *headers)
            assert (status, version) == expected[:2], (path, protocol, len(headers), status, body[:200])
            assert_json_error(body, expected[2])
