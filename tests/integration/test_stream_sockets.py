"""The stream service behind nginx on the same host (STREAM_SOCKET_DIR, stream/slots.py):
each gunicorn claims its own Unix socket, serves streams on it as on TCP, frees it
when it ends, and refuses to start, saying why, when every slot is taken."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.services import Service, eventually
from tests.support.sse import SSEParser


def unix_request(path: Path, target: str, timeout: float = 5) -> socket.socket:
    """GET `target` over a Unix socket, as nginx sends it; the open socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: herald\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while not done(data):
        assert time.monotonic() < deadline, f"timed out; got {data!r}"
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body (as far as it has come)."""
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        out, body = out + rest[:size], rest[size + 2 :]
    return out


def test_replicas_serve_streams_on_their_own_sockets(
    start: Callable[..., Service], tmp_path: Path, publish: Callable[..., str], channel: str
) -> None:
    first = start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="2")
    second = start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="2")
    assert [stats["slot"] for stats in (first_stats(first), first_stats(second))] == [1, 2]

    streams = [unix_request(tmp_path / f"stream-{n}.sock", f"/stream?channel={channel}") for n in (1, 2)]
    heads = []
    for sock in streams:
        head = read_until(sock, lambda d: b": ok" in d)
        assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
        heads.append(head)
    event_id = publish(channel, {"n": 1})
    for sock, head in zip(streams, heads, strict=True):
        body = head + read_until(sock, lambda d: event_id.encode() in d and d.endswith(b"\n\n\r\n"))
        frames = [f for f in SSEParser().feed(dechunk(body.split(b"\r\n\r\n", 1)[1])) if f.data]
        assert [(f.fields.get("id"), f.data) for f in frames][-1] == (event_id, ['{"n":1}'])
        sock.close()


def test_every_slot_taken_stops_the_next_replica_with_a_message(
    start: Callable[..., Service], tmp_path: Path
) -> None:
    start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="1")
    with pytest.raises(RuntimeError) as refused:
        start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="1")
    assert "all 1 stream slots" in str(refused.value) and "raise STREAM_SLOTS" in str(refused.value)


def test_a_killed_replica_leaves_its_slot_to_the_next(start: Callable[..., Service], tmp_path: Path) -> None:
    import signal

    first = start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="1")
    workers = first.worker_pids()
    first.stop(signal.SIGKILL)
    # Its workers hold the lock too (inherited), and follow their master within a second or two.
    assert eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 15)
    # Its socket file is still there (nobody removed it); the next replica takes it over.
    assert (tmp_path / "stream-1.sock").exists()
    second = start("stream", STREAM_SOCKET_DIR=str(tmp_path), STREAM_SLOTS="1")
    assert first_stats(second)["slot"] == 1
    sock = unix_request(tmp_path / "stream-1.sock", "/healthz")
    assert read_until(sock, lambda d: d.endswith(b"}\n")).startswith(b"HTTP/1.1 200 ")


def first_stats(service: Service) -> dict[str, object]:
    import requests

    stats: dict[str, object] = requests.get(service.url + "/stats", timeout=5).json()
    return stats
