"""A stream's writer on a real socket pair under gevent (no server, no Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import gevent
import gevent.socket
import pytest
from stream.writer import LAST_CHUNK, Limits, SocketWriter, YieldingWriter, chunk

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

    def make(*, chunked: bool = False, soft: int = 1 << 20, hard: int = 4 << 20, grace: float = 10.0) -> Pair:
        server, client = gevent.socket.socketpair()
        made.extend([server, client])
        ended: list[str] = []
        limits = Limits(soft, hard, grace)
        writer = SocketWriter(server, chunked=chunked, limits=limits, on_end=ended.append)
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
    writer, client, ended = pair(soft=4 << 20)
    writer.start(b"", b"")
    frames = [b"data: %d %s\n\n" % (i, b"x" * 1000) for i in range(2000)]  # ~2 MB: more than the socket holds
    assert all(writer.send_frame(f) for f in frames)
    assert writer._pending  # some of it is queued
    received = b""
    client.settimeout(2)
    while len(received) < sum(map(len, frames)):
        received += client.recv(65536)
    assert received == b"".join(frames) and ended == []


def receive(client: gevent.socket.socket, size: int) -> bytes:
    received = b""
    client.settimeout(2)
    while len(received) < size:
        received += client.recv(65536)
    return received


def test_a_burst_over_the_soft_limit_that_the_reader_drains_is_not_slow(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair(soft=64 * 1024, hard=4 << 20, grace=0.5)
    writer.start(b"", b"")
    burst = [b"data: %d %s\n\n" % (i, b"x" * 10_000) for i in range(100)]  # ~1 MB at once
    assert all(writer.send_frame(f) for f in burst)
    assert writer._pending_bytes > 64 * 1024  # over the soft limit for now
    assert receive(client, sum(map(len, burst))) == b"".join(burst)
    gevent.sleep(0.6)  # past the grace time: it drained in time, so nothing counts against it
    assert writer.send_frame(b"data: next\n\n") and writer.ended is None and ended == []


def test_a_client_over_the_soft_limit_for_the_grace_time_is_cut(pair: Callable[..., Pair]) -> None:
    writer, _client, ended = pair(soft=64 * 1024, hard=64 << 20, grace=0.2)
    writer.start(b"", b"")
    while writer._pending_bytes <= 64 * 1024:  # the client reads nothing
        assert writer.send_frame(b"x" * 4096)
    writer.beat()
    assert writer.ended is None  # over the soft limit, within the grace time
    deadline = time.monotonic() + 2
    while writer.ended is None and time.monotonic() < deadline:
        gevent.sleep(0.05)
        writer.beat()  # the clock's heartbeat tick checks it even with no new event
    assert writer.ended == "slow"
    assert wait_until(lambda: ended == ["slow"])


def test_a_client_that_does_not_read_is_cut_at_the_hard_limit(pair: Callable[..., Pair]) -> None:
    writer, _client, ended = pair(soft=16 * 1024, hard=256 * 1024, grace=60)
    writer.start(b"", b"")
    results = [writer.send_frame(b"x" * 4096) for _ in range(400)]
    assert False in results
    assert all(results[: results.index(False)]) and not any(results[results.index(False) :])
    assert writer.ended == "slow"
    assert wait_until(lambda: ended == ["slow"])


def test_catch_up_pages_go_out_one_at_a_time_past_the_hard_limit(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair(soft=16 * 1024, hard=32 * 1024, grace=1.0)
    head = b"HEAD\r\n\r\n"
    pages = [b"".join(b"data: %d.%d %s\n\n" % (p, i, b"x" * 100) for i in range(1000)) for p in range(3)]
    writer.start(head, pages[0])  # ~110 KB each: over the hard limit, still not slow
    got = b""
    for page in pages[1:]:
        reader = gevent.spawn(receive, client, len(head) + len(pages[0]) if not got else len(page))
        assert writer.wait_drained(1.0)
        got += reader.get()
        assert writer.send_page(page)
    got += receive(client, len(pages[-1]))
    assert got == head + b"".join(pages) and writer.ended is None and ended == []


def test_waiting_to_drain_gives_up_when_the_client_reads_nothing(pair: Callable[..., Pair]) -> None:
    writer, _client, _ = pair(soft=16 * 1024, hard=32 * 1024)
    writer.start(b"", b"x" * (1 << 20))
    started = time.monotonic()
    assert not writer.wait_drained(0.2)
    assert 0.2 <= time.monotonic() - started < 1.5 and writer.ended is None


def test_a_client_hanging_up_is_noticed_without_a_write(pair: Callable[..., Pair]) -> None:
    writer, client, ended = pair()
    writer.start(b"", b": ok\n\n")
    client.close()
    assert wait_until(lambda: ended == ["gone"])
    assert writer.ended == "gone" and not writer.send_frame(b"data: late\n\n")


def test_the_yielding_writer_hands_its_frames_to_the_body_then_ends() -> None:
    ended: list[str] = []
    writer = YieldingWriter(limits=Limits(1000, 2000, 1.0), on_end=ended.append)
    writer.send_frame(b"a")
    writer.send_frame(b"b")
    frames = writer.frames()
    assert next(frames) == b"ab"
    writer.end(b"z")
    assert list(frames) == [b"z"]
    assert not writer.send_frame(b"late") and ended == []
