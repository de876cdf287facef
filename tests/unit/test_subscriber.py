"""The subscriber's buffer and its fast path (the hub writing straight to the socket)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from stream.subscriber import CONTROL, RAW, Push, Subscriber, chunk


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(False)
    yield server, client
    server.close()
    client.close()


def live(sub: Subscriber, sock: socket.socket) -> Subscriber:
    sub.sock, sub.direct = sock, True
    return sub


def test_chunk_framing() -> None:
    assert chunk(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"


def test_live_client_gets_events_without_queueing(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    sub = live(Subscriber(["a"], 1024), server)
    frame = b"id: e-1\ndata: 1\n\n"
    assert sub.push(1, frame, chunk(frame)) is Push.DELIVERED
    assert not sub.pending and sub.direct and sub.last == 1
    assert client.recv(100) == chunk(frame)


def test_partial_write_queues_the_rest_and_hands_over_to_the_greenlet(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _client = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sub = live(Subscriber(["a"], 10_000_000), server)
    big = b"data: " + b"x" * 1_000_000 + b"\n\n"
    assert sub.push(1, big, chunk(big)) is Push.DELIVERED  # partly written, the rest queued
    assert not sub.direct and sub.pending
    later = b"data: 2\n\n"
    sub.push(2, later)
    items = sub.take(0)
    assert items[0][0] == RAW and chunk(big).endswith(items[0][1])
    assert 0 < len(items[0][1]) < len(chunk(big))
    assert items[1] == (2, later)


def test_a_client_too_far_behind_is_dropped(pair: tuple[socket.socket, socket.socket]) -> None:
    sub = Subscriber(["a"], 100)
    assert sub.push(1, b"x" * 60) is Push.DELIVERED
    assert sub.push(2, b"x" * 60) is Push.DROPPED
    assert sub.closed == "slow"
    assert sub.push(3, b"x") is Push.GONE  # a closed client counts nothing more
    assert sub.take(0) == []


def test_resets_and_old_events_never_take_the_fast_path(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    sub = live(Subscriber(["a"], 1024), server)
    sub.last = 5
    sub.push(CONTROL, b"event: reset\n\n")
    assert not sub.direct and sub.take(0) == [(CONTROL, b"event: reset\n\n")]
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(10)


def test_a_vanished_peer_closes_the_subscriber(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.close()
    sub = live(Subscriber(["a"], 1024), server)
    # The write that finds the peer gone is not a delivery, nor is any after it.
    assert sub.push(1, b"data: 1\n\n") is Push.GONE
    assert sub.push(2, b"data: 2\n\n") is Push.GONE
    assert sub.closed == "gone"
