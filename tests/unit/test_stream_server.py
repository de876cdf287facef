"""stream.server: what the stream service relies on in gunicorn, and its refusal
to start under a gunicorn it was not written for."""

from __future__ import annotations

import gevent.socket
import gunicorn
import pytest
from stream import server


def test_the_installed_gunicorn_is_the_one_it_was_written_for() -> None:
    assert gunicorn.version_info[0] == server.WRITTEN_FOR
    server.check_version()


def test_another_major_version_is_refused_with_what_to_do() -> None:
    with pytest.raises(SystemExit) as refused:
        server.check_version((server.WRITTEN_FOR + 1, 0, 0))
    message = str(refused.value)
    assert f"{server.WRITTEN_FOR + 1}.0.0" in message
    assert "stream/server.py" in message and "WRITTEN_FOR" in message


def test_the_raw_socket_is_the_plain_one_under_gevents() -> None:
    left, right = gevent.socket.socketpair()
    try:
        raw = server.raw_socket(left)
        # The same connection, not gevent's wrapper, and never waits.
        assert raw is not left and raw.fileno() == left.fileno() and not raw.getblocking()
        assert server.raw_socket(raw) is raw
    finally:
        left.close()
        right.close()
