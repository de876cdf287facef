"""No subscribe token reaches a log, whatever the request's fate (issue 16, item 5).

Subscribe tokens travel as ?token= (EventSource cannot send headers). nginx's
error log prints the whole request line (and the upstream URL) on refused
streams, upstream errors and bad requests; gunicorn logs the request line of a
request it cannot parse. This test makes each of those happen with tokens in
the URL (several token parameters, percent-encoded names, a quote in the
query), checks that each kind of line was logged, and then searches the output
of every container of the stack (nginx's access and error logs included) for
the tokens. It runs on the front_door stack (small limits, tests/e2e/conftest.py).
"""

from __future__ import annotations

import secrets
import socket
import time

import jwt
import requests

from tests.e2e.conftest import FRONT_DOOR_SETTINGS
from tests.e2e.support import Stack, wait_until

STREAMS_PER_IP = int(FRONT_DOOR_SETTINGS["STREAMS_PER_IP"])
MAX_STREAMS = int(FRONT_DOOR_SETTINGS["NGINX_MAX_STREAMS"])
READ_BURST = int(FRONT_DOOR_SETTINGS["READ_BURST"])


def leak() -> str:
    return "leak" + secrets.token_hex(10)


def raw_request(stack: Stack, head: bytes) -> bytes:
    """Send a request as raw bytes (requests would encode what must stay raw);
    return the start of the answer."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(head)
        return sock.recv(4096)


def get(stack: Stack, target: str, client: str) -> bytes:
    """GET `target` (sent as is) as the client `client` (X-Forwarded-For)."""
    head = f"GET {target} HTTP/1.1\r\nHost: herald\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n"
    return raw_request(stack, head.encode("latin-1"))


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def open_raw_stream(stack: Stack, target: str) -> socket.socket:
    """A stream opened with `target` sent as is (requests would decode %74oken),
    read up to its `retry:` line: subscribed."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: herald\r\nAccept: text/event-stream\r\n\r\n".encode())
    received = b""
    deadline = time.monotonic() + 15
    while b"retry:" not in received:
        assert time.monotonic() < deadline, received
        chunk = sock.recv(4096)
        assert chunk, f"the stream ended before its preamble: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200 "), received
    return sock


def read_to_end(sock: socket.socket, timeout: float) -> None:
    """Read a stream until it ends, cleanly or cut; fail if it is still open at `timeout`
    (heartbeats keep coming on an open one)."""
    deadline = time.monotonic() + timeout
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return
        except TimeoutError:
            continue
        except OSError:
            return  # reset: ended all the same
    raise AssertionError(f"the stream was still open after {timeout} s")


def hold_streams(stack: Stack, channel: str, client: str, count: int) -> list[requests.Response]:
    """`count` streams open as `client` (a stream an earlier test just closed may
    still count for a moment: nginx notices a closed connection at its next event)."""

    def accepted() -> requests.Response | None:
        answer = requests.get(
            stack.url(f"/stream?channel={channel}"),
            headers={"X-Forwarded-For": client},
            stream=True,
            timeout=(5, 15),
        )
        if answer.status_code == 200:
            return answer
        answer.close()
        return None

    return [wait_until(accepted, 15, f"a stream for {client}") for _ in range(count)]


def test_tokens_never_reach_any_log(front_door: Stack, channel: str) -> None:
    stack = front_door
    secret = stack.settings["SUBSCRIBE_SECRET"]
    tokens: list[str] = []

    def token() -> str:
        tokens.append(leak())
        return tokens[-1]

    # 1. Refused streams: over STREAMS_PER_IP (429), then over NGINX_MAX_STREAMS (503).
    full, other, late = "198.51.100.30", "198.51.100.31", "198.51.100.32"
    held = hold_streams(stack, channel, full, STREAMS_PER_IP)
    try:
        refused = [
            f"/stream?channel={channel}&token={token()}&token={token()}",
            f"/stream?channel={channel}&%74oken={token()}&TO%6BEN={token()}",
            f'/stream?channel={channel}&a="&token={token()}',
        ]
        for target in refused:
            assert status_of(get(stack, target, full)) == 429, target
        held += hold_streams(stack, channel, other, MAX_STREAMS - STREAMS_PER_IP)
        assert status_of(get(stack, f"/stream?channel={channel}&t%6Fken={token()}", late)) == 503
    finally:
        for response in held:
            response.close()

    # 2. Bad requests: a body over MAX_BODY_BYTES (nginx, 413), reads over
    # READ_RATE (nginx, 429), a request line nginx passes on and gunicorn cannot
    # parse (a raw byte >= 0x80), one nginx cannot parse itself (400).
    too_large = int(stack.settings["MAX_BODY_BYTES"]) + 1
    head = f"POST /publish?token={token()} HTTP/1.1\r\nHost: herald\r\nContent-Length: {too_large}\r\n\r\n"
    assert status_of(raw_request(stack, head.encode())) == 413
    reads = [get(stack, f"/history?channel={channel}&token={token()}", "198.51.100.33")]
    reads += [
        get(stack, f"/history?channel={channel}&token={tokens[-1]}", "198.51.100.33")
        for _ in range(READ_BURST + 2)
    ]
    assert 429 in [status_of(answer) for answer in reads]
    assert status_of(get(stack, f"/stream?channel={channel}&token={token()}&x=\xff", "198.51.100.34")) == 400
    assert status_of(get(stack, f"/stream?channel={channel} x&token={token()}", "198.51.100.35")) == 400

    # 3. Streams open when their replica dies (killed, then started again):
    # valid tokens for private channels, one under a percent-encoded name.
    private = f"private-{channel}"
    expires = int(time.time()) + 600
    valid = [
        jwt.encode({"channels": [private], "exp": expires + i}, secret, algorithm="HS256") for i in range(2)
    ]
    tokens += valid
    names = ("token", "%74oken")
    open_streams = [
        open_raw_stream(stack, f"/stream?channel={private}&{n}={v}")
        for n, v in zip(names, valid, strict=True)
    ]
    replica = stack.containers("stream-service")[0]
    try:
        stack.docker("kill", replica)
        for sock in open_streams:  # each stream ends: nginx cuts it when its upstream goes
            read_to_end(sock, timeout=20)
    finally:
        for sock in open_streams:
            sock.close()
        stack.docker("start", replica)
        stack.wait_healthy("stream-service", 1, timeout=90)

    # Every kind of line was written (else the test proves nothing)...
    def logs() -> str:
        result = stack.compose("logs", "--no-color", timeout=60)
        return result.stdout + result.stderr

    # Each kind of line, as any of these texts.
    expected = [
        ('limiting connections by zone "herald_streams_per_ip"',),
        ('limiting connections by zone "herald_streams_all"',),
        ("client intended to send too large body",),
        ("limiting requests, excess",),
        # The replica's death, as nginx saw it (a FIN or a reset).
        ("upstream prematurely closed connection", "Connection reset by peer) while reading upstream"),
        ("Invalid request from ip=",),
    ]

    def all_logged() -> str | None:
        text = logs()
        return text if all(any(e in text for e in kind) for kind in expected) else None

    text: str = wait_until(all_logged, 20, "every kind of log line")
    # ...and no token is in any of them: no container's output, nginx's access
    # and error logs included.
    leaked = [value for value in tokens if value in text]
    assert not leaked, f"{len(leaked)} of {len(tokens)} tokens are in the logs: {leaked}"
    # nginx's error lines keep the path, without the query.
    assert 'request: "GET /stream?[redacted] HTTP/1.1"' in text
