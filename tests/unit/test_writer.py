"""A stream's writer on a real socket pair under gevent (no server, no Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import gevent
import gevent.socket
import pytest
from stream.writer import LAST_CHUNK, SocketWriter, YieldingWriter, chunk

Pair = tuple[SocketWriter, gevent.socket.socket, list[str]]


def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True


def read_all(sock: gevent.socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


@pytest.fixture
def pair() -> Iterator[Callable[..., Pair]]:
    made: list[gevent.socket.socket] = []

    def make(*, chunked: bool = False, limit: int = 1 << 20) -> Pair:
        server, client = gevent.socket.socketpair()
        made.extend([server, client])
        ended: list[str] = []
        writer = SocketWriter(server, chunked=chunked, limit_bytes=limit, on_end=ended.append)
        return writer, client, ended

    yield make
    for sock in made:
        sock.close()


def test_the_connection_outlives_the_servers_close_and_the_end_closes_it(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair()
    writer.start(b"HEAD\r\n\r\n", b": ok\n\n")
    writer._sock.close()  # what gunicorn does when the request's greenlet ends
    assert writer.send_frame(b"data: 1\n\n")
    writer.beat()
    writer.end(b"data: last\n\n")
    assert read_all(client) == b"HEAD\r\n\r\n: ok\n\ndata: 1\n\n: hb\n\ndata: last\n\n"
    assert writer.ended == "ended" and ended == []  # an end the core decided: no callback


def test_a_chunked_response_frames_each_write_and_ends_with_the_last_chunk(pair: Callable[..., Pair]) -> None:
    writer, client, _ = pair(chunked=True)
    writer.start(b"HEAD\r\n\r\n", b": ok\n\n")
    writer.send_frame(b"data: 1\n\n")
    writer.end()
    assert read_all(client) == b"HEAD\r\n\r\n" + chunk(b": ok\n\n") + chunk(b"data: 1\n\n") + LAST_CHUNK


def test_what_the_socket_does_not_take_is_written_as_it_drains_in_order(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair(limit=4 << 20)
    writer.start(b"", b"")
    frames = [b"data: %d %s\n\n" % (i, b"x" * 1000) for i in range(2000)]  # ~2 MB: more than the socket holds
    assert all(writer.send_frame(f) for f in frames)
    assert writer._pending  # some of it is queued
    received = b""
    client.settimeout(2)
    while len(received) < sum(map(len, frames)):
        received += client.recv(65536)
    assert received == b"".join(frames) and ended == []


def test_a_catch_up_longer_than_the_limit_is_not_a_slow_client(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair(limit=64 * 1024)
    replay = b"".join(b"data: %d %s\n\n" % (i, b"x" * 100) for i in range(20_000))  # ~2.2 MB
    writer.start(b"HEAD\r\n\r\n", replay)
    assert writer.ended is None and writer._pending
    assert writer.send_frame(b"data: live\n\n")  # a live event behind the backlog is fine
    expected = b"HEAD\r\n\r\n" + replay + b"data: live\n\n"
    received = b""
    client.settimeout(2)
    while len(received) < len(expected):
        received += client.recv(65536)
    assert received == expected and ended == []
    # Drained: the limit holds again for live events.
    results = [writer.send_frame(b"y" * 4096) for _ in range(400)]
    assert writer.ended == "slow" and False in results


def test_a_client_that_does_not_read_is_cut_at_the_limit(pair: Callable[..., Pair]) -> None:
    writer, _client, ended = pair(limit=64 * 1024)
    writer.start(b"", b"")
    results = [writer.send_frame(b"x" * 4096) for _ in range(400)]
    assert False in results
    assert all(results[: results.index(False)]) and not any(results[results.index(False) :])
    assert writer.ended == "slow"
    assert wait_until(lambda: ended == ["slow"])


def test_a_client_hanging_up_is_noticed_without_a_write(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair()
    writer.start(b"", b": ok\n\n")
    client.close()
    assert wait_until(lambda: ended == ["gone"])
    assert writer.ended == "gone" and not writer.send_frame(b"data: late\n\n")


def test_the_yielding_writer_hands_its_frames_to_the_body_then_ends() -> None:
    ended: list[str] = []
    writer = YieldingWriter(limit_bytes=1000, on_end=ended.append)
    writer.send_frame(b"a")
    writer.send_frame(b"b")
    frames = writer.frames()
    assert next(frames) == b"ab"
    writer.end(b"z")
    assert list(frames) == [b"z"]
    assert not writer.send_frame(b"late") and ended == []
