# Twins: write_error() here and in stream-service/stream/server.py are
# identical, so both services answer gunicorn's own refusals alike: change both
# together (tests/unit/test_conventions.py checks it).
"""Everything the publisher relies on in gunicorn beyond WSGI, in one place:
its worker, gevent's, with one write per answer and a prompt stop.

gunicorn sends an answer's header block and its body with two `sendall` calls:
two system calls, two TCP segments, and two reads for nginx, for a publish answer
of ~300 bytes. This worker holds the first write of each answer back until the
next one (or the end of the request) and sends both together. And the Date
header is formatted once a second, not once per answer (~13 µs each).

It also closes idle keep-alive connections when it stops. nginx keeps idle
connections to the publisher open for reuse, and gunicorn waits
up to `keepalive` seconds on each for its next request, also once it has been
told to stop: a graceful stop would then hang until `graceful_timeout` and end in
a forced kill. This worker ends those waits as soon as it stops (and makes any
later wait short), so the connections close as gunicorn closes any idle
keep-alive connection; requests in progress still finish.

Written for gunicorn 27 (requirements.txt pins 27.0.1), it relies on:

- `gunicorn.util.http_date()`: what gunicorn calls for each answer's Date
  header (`http/wsgi.py`); replaced in each worker process by `_HttpDate`.
- `gunicorn.util.write_error(sock, status_int, reason, mesg)`: what the
  worker's `handle_error` calls to answer a request gunicorn itself refuses
  (its parser, its limits); replaced in each worker process by `write_error`,
  which answers JSON.
- `GeventWorker.handle_request(listener_name, req, sock, addr)`: writes the
  whole answer on `sock` with `sendall` (`workers/base_async.py`); given a
  `_OneWrite` in its place.
- `GeventWorker.timeout_ctx()`: the context the keep-alive loop waits in for
  the next request (`AsyncWorker.handle`), ended silently by a
  `gevent.Timeout(keepalive, False)`, after which gunicorn closes the
  connection; replaced by `_WaitForRequest`.
- `handle_exit(sig, frame)`, `init_process()`, the worker's `alive` and
  `cfg.keepalive`.
- Elsewhere: gunicorn.conf.py's settings (`control_socket_disable` is new in
  27) and `logger_class`, publisher.logs.GunicornLogger, which overrides
  `glogging.Logger.access` (logs.py is the stream service's twin, so it stays
  there).

At start, gunicorn.conf.py calls `check_version`, which refuses (exits) under
any other major version than `WRITTEN_FOR`. Refuse rather than warn: a piece
above that no longer holds does not fail loudly, it sends answers late or
twice, a stale Date, or hangs a graceful stop, and a warning in a log is read
after the damage. gunicorn is pinned, so only a deliberate upgrade meets the
refusal. To upgrade: check each piece above against the new gunicorn's
`workers/base_async.py`, `workers/ggevent.py`, `http/wsgi.py`, `util.py` and
`glogging.py`; run tests/unit/test_publisher_server.py and tests/integration
(their publishes go through gunicorn and this module); then set `WRITTEN_FOR`.
"""

from __future__ import annotations

import json
import time
from types import FrameType
from typing import Any

import gevent
import gunicorn
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

WRITTEN_FOR = 27  # gunicorn's major version

# How long a connection waits for its next request once the worker is stopping.
STOPPING_WAIT_SECONDS = 1.0


def write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own error answer (`gunicorn.util.write_error`), as JSON.

    gunicorn answers a request it cannot parse or refuses by its limits (a
    malformed request line, over 100 header fields, a field over 8190 bytes:
    over HTTP/2 nginx measures fields compressed and lets such ones through)
    before the app sees it, with an HTML page. This writes the services' JSON
    error instead, `{"error": code, "message": message}`, with a fixed message
    per status: gunicorn's own (`mesg`) can quote the request line, and with
    it a token in the query string.
    """
    code, message = {
        403: ("forbidden", "the request is forbidden"),
        414: ("uri_too_long", "the request URI is too long"),
        417: ("expectation_failed", "the request's Expect header cannot be met"),
        431: ("header_too_large", "the request has too many header fields, or one too large"),
        500: ("internal_error", "an unexpected error occurred"),
        501: ("not_implemented", "the request's transfer coding is not supported"),
    }.get(status_int, ("bad_request", "the request is malformed"))
    body = json.dumps({"error": code, "message": message}).encode() + b"\n"
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def check_version(version: tuple[int, ...] = gunicorn.version_info) -> None:
    """Exit, saying what to check, unless gunicorn's major version is WRITTEN_FOR."""
    if version[0] == WRITTEN_FOR:
        return
    found = ".".join(map(str, version))
    raise SystemExit(
        f"herald-publisher: publisher/server.py was written for gunicorn {WRITTEN_FOR}.x, not {found}. "
        "Check each piece its docstring lists against this gunicorn, run the publisher tests, "
        "then set WRITTEN_FOR; or install the gunicorn of requirements.txt."
    )


class _HttpDate:
    """gunicorn's `util.http_date`, formatting the current second only once."""

    def __init__(self, format_date: Any) -> None:
        self._format = format_date
        self._second = -1
        self._text = ""

    def __call__(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return str(self._format(timestamp))
        now = int(time.time())  # what the header shows: whole seconds
        if now != self._second:
            self._text = str(self._format(now))
            self._second = now
        return self._text


class _WaitForRequest:
    """A connection's wait for its next request, which the worker can end early.

    It ends like gunicorn's own keep-alive timeout (gevent's silent `Timeout`):
    gunicorn then closes the connection as it would any idle one.
    """

    __slots__ = ("_me", "_timeout", "_worker")

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # Once stopping, a connection gets a moment for a request already on its
        # way (an answer sent just now was not marked `Connection: close`).
        seconds = worker.keepalive if worker.alive else STOPPING_WAIT_SECONDS
        self._timeout = gevent.Timeout(seconds, False)

    def __enter__(self) -> None:
        self._me = gevent.getcurrent()
        self._worker.waits.add(self)
        self._timeout.start()

    def __exit__(self, *exc: object) -> bool:
        self._worker.waits.discard(self)
        self._timeout.close()
        return exc[1] is self._timeout  # the wait ran out: no request, close

    def end(self) -> None:
        """End the wait now, if the connection is still waiting (run by the hub)."""
        if self in self._worker.waits:
            self._me.throw(self._timeout)


class _OneWrite:
    """The client socket for one request, sending its first write with the next."""

    __slots__ = ("_held", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._held: bytes | None = b""  # b"": nothing written yet; None: no longer holding

    def sendall(self, data: bytes) -> None:
        held = self._held
        if held == b"":
            self._held = bytes(data)
            return
        if held is not None:
            self._held = None
            data = held + data
        self._send(data)

    def _send(self, data: bytes) -> None:
        # gevent's sendall asks the kernel for the socket's buffer size on every
        # call; a send() that takes everything (the usual case) does not.
        sent = self._sock.send(data)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def flush(self) -> None:
        """Send what is held back; after this, writes go straight out."""
        held, self._held = self._held, None
        if held:
            self._send(held)

    def __getattr__(self, name: str) -> Any:
        # Anything else (send, sendfile, fileno...) flushes first, to keep the order.
        self.flush()
        return getattr(self._sock, name)


class Worker(GeventWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's gevent worker that does not wait on idle connections to stop."""

    def init_process(self) -> None:
        self.waits: set[_WaitForRequest] = set()  # connections waiting for a request
        self.keepalive = self.cfg.keepalive
        util.http_date = _HttpDate(util.http_date)  # in this worker process only
        util.write_error = write_error
        super().init_process()

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        out = _OneWrite(sock)
        try:
            return super().handle_request(listener_name, req, out, addr)
        finally:
            out.flush()

    def timeout_ctx(self) -> _WaitForRequest:
        return _WaitForRequest(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self) -> None:
        # From the hub, like a timeout: a connection that has meanwhile started
        # on a request is no longer waiting, and is left alone.
        loop = gevent.get_hub().loop
        for wait in list(self.waits):
            loop.run_callback(wait.end)
