"""The front door's limits per client address, through the Compose nginx.

On the front_door stack (conftest.FRONT_DOOR_SETTINGS): STREAMS_PER_IP open
streams per address (beyond: JSON 429 too_many_streams), NGINX_MAX_STREAMS over
all addresses (beyond: JSON 503 service_unavailable), READ_RATE/READ_BURST for
/history and /channels/... (beyond: JSON 429 rate_limited), and REAL_IP_FROM:
nginx believes X-Forwarded-For from the Docker networks the host's requests
come from, so each test is one or several clients of its own, with addresses
from the documentation ranges (RFC 5737).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence

import pytest
import requests

from tests.e2e.conftest import FRONT_DOOR_SETTINGS
from tests.e2e.support import Stack, wait_until

STREAMS_PER_IP = int(FRONT_DOOR_SETTINGS["STREAMS_PER_IP"])
MAX_STREAMS = int(FRONT_DOOR_SETTINGS["NGINX_MAX_STREAMS"])
READ_BURST = int(FRONT_DOOR_SETTINGS["READ_BURST"])


def open_stream(stack: Stack, channel: str, client: str | None, query: str = "") -> requests.Response:
    """GET /stream as the client `client` (X-Forwarded-For; None: the host itself)."""
    headers = {"Accept": "text/event-stream"}
    if client is not None:
        headers["X-Forwarded-For"] = client
    url = stack.url(f"/stream?channel={channel}{query}")
    return requests.get(url, headers=headers, stream=True, timeout=(5, 15))


class Streams:
    """Open streams, closed at the end of the test whatever happens."""

    def __init__(self) -> None:
        self.held: list[requests.Response] = []

    def keep(self, response: requests.Response) -> requests.Response:
        self.held.append(response)
        return response

    def close(self) -> None:
        for response in self.held:
            response.close()
        self.held.clear()


@pytest.fixture
def streams() -> Iterator[Streams]:
    held = Streams()
    try:
        yield held
    finally:
        held.close()


def assert_json_refusal(answer: requests.Response, status: int, code: str) -> None:
    try:
        assert answer.status_code == status, (answer.status_code, answer.text[:300])
        assert answer.headers["Content-Type"] == "application/json", answer.headers
        body = answer.json()
        assert set(body) == {"error", "message"} and body["error"] == code, body
        assert body["message"]
        assert int(answer.headers["Retry-After"]) >= 1, answer.headers
    finally:
        answer.close()


def accepted(stack: Stack, channel: str, client: str | None) -> requests.Response | None:
    """A new stream if it was accepted (200); a refused one is closed at once."""
    answer = open_stream(stack, channel, client)
    if answer.status_code == 200:
        return answer
    answer.close()
    return None


def open_all(stack: Stack, streams: Streams, channel: str, clients: Sequence[str | None]) -> None:
    """One stream per entry of `clients`. A stream an earlier test just closed may
    still count for a moment (nginx notices a closed connection at its next event)."""
    for client in clients:

        def attempt(client: str | None = client) -> requests.Response | None:
            return accepted(stack, channel, client)

        streams.keep(wait_until(attempt, 15, f"a stream for {client}"))


def test_streams_per_address_get_429_while_other_addresses_and_the_global_cap_get_theirs(
    front_door: Stack, channel: str, streams: Streams
) -> None:
    a, b, c, d = "198.51.100.10", "198.51.100.11", "198.51.100.12", "198.51.100.13"
    open_all(front_door, streams, channel, [a] * STREAMS_PER_IP)
    # One more from the same address: refused by nginx with its own JSON 429.
    assert_json_refusal(open_stream(front_door, channel, a), 429, "too_many_streams")
    # A proxy in front (trusted: REAL_IP_FROM) appends the address it saw; what
    # the client wrote before it does not make it someone else (real_ip_recursive).
    assert_json_refusal(open_stream(front_door, channel, f"203.0.113.99, {a}"), 429, "too_many_streams")
    # Another address still gets streams, up to the global cap (NGINX_MAX_STREAMS)...
    others = [b] * STREAMS_PER_IP + [c] * (MAX_STREAMS - 2 * STREAMS_PER_IP)
    open_all(front_door, streams, channel, others)
    # ...beyond which every address, even one with no stream at all, gets the 503.
    assert_json_refusal(open_stream(front_door, channel, d), 503, "service_unavailable")
    # Both counts go down with the streams: the full address is welcome again.
    streams.close()
    again = wait_until(lambda: accepted(front_door, channel, a), 15, "a stream for the address again")
    streams.keep(again)


def test_an_ipv6_client_is_its_64(front_door: Stack, channel: str, streams: Streams) -> None:
    """A host has a whole IPv6 /64 to pick addresses from: the limit counts the /64."""
    open_all(front_door, streams, channel, [f"2001:db8:5:6::{n}" for n in range(1, STREAMS_PER_IP + 1)])
    assert_json_refusal(open_stream(front_door, channel, "2001:db8:5:6:ffff:1:2:3"), 429, "too_many_streams")
    open_all(front_door, streams, channel, ["2001:db8:5:7::1"])


def test_read_rate_per_address_answers_json_429_on_history_and_presence(
    front_door: Stack, channel: str
) -> None:
    """/history and /channels/... share one bucket per address (READ_RATE, READ_BURST)."""
    e, f = {"X-Forwarded-For": "198.51.100.20"}, {"X-Forwarded-For": "198.51.100.21"}
    session = requests.Session()
    history = front_door.url(f"/history?channel={channel}")
    presence = front_door.url(f"/channels/{channel}")
    answers = [session.get(history, headers=e, timeout=10) for _ in range(READ_BURST + 4)]
    statuses = [answer.status_code for answer in answers]
    # The burst passes (the stream service answers), the rest is refused by nginx.
    assert statuses[0] == 200 and 429 in statuses, statuses
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert_json_refusal(limited, 429, "rate_limited")
    assert limited.headers["Retry-After"] == "1"
    # The same bucket: presence from that address is refused as well (the bucket
    # drains one request per second, and it is well over the burst)...
    assert_json_refusal(session.get(presence, headers=e, timeout=10), 429, "rate_limited")
    # ...while another address is answered by the services (presence needs the token).
    assert session.get(history, headers=f, timeout=10).status_code == 200
    assert session.get(presence, headers=f, timeout=10).status_code == 401
    session.close()


def test_a_client_that_sends_its_headers_slowly_is_cut(front_door: Stack) -> None:
    """client_header_timeout (10 s, nginx/nginx.conf): a request's headers must
    all arrive in time, however slowly a client trickles them (slowloris)."""
    with socket.create_connection(("127.0.0.1", front_door.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /stream?channel=slow HTTP/1.1\r\nHost: herald\r\n")
        deadline = started + 25
        closed = False
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # a header line every second, never the end
            except OSError:
                closed = True
                break
            sock.settimeout(1)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
        waited = time.monotonic() - started
    assert closed, f"nginx still held the connection after {waited:.1f} s"
    assert 8 <= waited <= 20, waited


def test_x_forwarded_for_is_ignored_without_real_ip_from(stack: Stack, channel: str) -> None:
    """The default (REAL_IP_FROM empty): nginx logs and limits the peer's address,
    not one a client names."""
    assert not stack.settings.get("REAL_IP_FROM")
    spoofed = "198.51.100.77"
    marker = f"{channel}-xff"
    answer = requests.get(
        stack.url(f"/history?channel={marker}"), headers={"X-Forwarded-For": spoofed}, timeout=10
    )
    assert answer.status_code == 200, answer.text[:300]

    def logged() -> list[str]:
        return [line for line in stack.nginx_log() if marker in line and "GET /history" in line]

    lines = wait_until(logged, 10, "the request in nginx's access log")
    assert all(not line.startswith(spoofed) for line in lines), lines
