"""stream.server: what the stream service relies on in gunicorn, its refusal
to start under a gunicorn it was not written for, and gunicorn's own errors
as JSON (with the publisher's twin)."""

from __future__ import annotations

import json
import socket
from typing import Any

import gevent.socket
import gunicorn
import pytest
from publisher import server as publisher_server
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


@pytest.mark.parametrize("status", [400, 403, 414, 417, 431, 500, 501])
@pytest.mark.parametrize("write_error", [server.write_error, publisher_server.write_error])
def test_gunicorns_own_refusals_are_json_without_its_message(status: int, write_error: Any) -> None:
    """Both services' write_error (twins): what gunicorn refuses before the app
    (a malformed request, its header limits) is answered as JSON, and its own
    message, which can quote the request line and a token with it, is not."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        write_error(ours, status, "Some Reason", "Invalid Request Line 'GET /stream?token=s3cr3t HTTP/1.1'")
        ours.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := theirs.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status} Some Reason"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields == {
        "Connection": "close",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
    }
    parsed = json.loads(body)
    assert set(parsed) == {"error", "message"}
    assert parsed["error"] == {400: "bad_request", 414: "uri_too_long", 431: "header_too_large"}.get(
        status, parsed["error"]
    )
    assert parsed["error"] != "bad_request" or status == 400
    assert b"s3cr3t" not in answer and b"Invalid" not in answer
