"""publisher.server: the pieces of the gunicorn worker that need no server."""

from __future__ import annotations

from typing import Any

import pytest
from gunicorn import util
from publisher.server import _HttpDate, _OneWrite, check_version


class FakeSocket:
    def __init__(self, accept: int | None = None) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.accept = accept  # bytes a send() takes at most

    def send(self, data: Any) -> int:
        taken = bytes(data)[: self.accept] if self.accept else bytes(data)
        self.calls.append(("send", taken))
        return len(taken)

    def sendall(self, data: Any) -> None:
        self.calls.append(("sendall", bytes(data)))

    def fileno(self) -> int:
        return 7


def test_the_header_block_goes_out_with_the_body() -> None:
    sock = FakeSocket()
    out = _OneWrite(sock)
    out.sendall(b"HTTP/1.1 202 Accepted\r\n\r\n")
    assert sock.calls == []
    out.sendall(b"{}")
    out.sendall(b"more")
    out.flush()
    assert sock.calls == [("send", b"HTTP/1.1 202 Accepted\r\n\r\n{}"), ("send", b"more")]


def test_a_lone_write_goes_out_at_the_end_of_the_request() -> None:
    sock = FakeSocket()
    out = _OneWrite(sock)
    out.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    out.flush()
    out.flush()
    assert sock.calls == [("send", b"HTTP/1.1 204 No Content\r\n\r\n")]


def test_other_socket_use_sends_what_is_held_first() -> None:
    sock = FakeSocket()
    out = _OneWrite(sock)
    out.sendall(b"head")
    assert out.fileno() == 7
    assert sock.calls == [("send", b"head")]


def test_a_partial_send_is_completed() -> None:
    sock = FakeSocket(accept=3)
    out = _OneWrite(sock)
    out.sendall(b"head")
    out.sendall(b"body")
    assert sock.calls == [("send", b"hea"), ("sendall", b"dbody")]


def test_the_date_header_is_gunicorns() -> None:
    http_date = _HttpDate(util.http_date)
    for _ in range(3):  # away from a change of second
        before, ours, after = util.http_date(), http_date(), util.http_date()
        if before == after:
            assert ours == before
            break
    assert http_date(0) == util.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_the_gunicorn_it_was_written_for_passes_the_check() -> None:
    check_version()  # the installed one, which requirements.txt pins
    check_version((27, 9, 0))


def test_another_major_version_of_gunicorn_is_refused_saying_what_to_check() -> None:
    with pytest.raises(SystemExit, match=r"written for gunicorn 27\.x, not 28\.0\.0\. Check each piece"):
        check_version((28, 0, 0))
