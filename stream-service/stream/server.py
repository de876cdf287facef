# Twins: write_error() here and in publisher-service/publisher/server.py are
# identical, so both services answer gunicorn's own refusals alike: change both
# together (tests/unit/test_conventions.py checks it).
"""Everything the stream service relies on in gunicorn beyond WSGI, in one place.

The handover (handover.py) and the worker hooks need more of gunicorn than WSGI
gives. Every such piece is here, written for gunicorn 27 (requirements.txt pins
27.0.1), with what it relies on:

- `ALREADY_HANDLED`: an async worker (gevent's) takes this return value of the
  WSGI app to mean "answered on the socket already": it writes nothing more,
  and its request's greenlet ends. It does not log such a request in its
  access log.
- `SOCKET_KEY`, `"gunicorn.socket"`: the environ key of the connection's
  socket, gevent's cooperative socket under the gevent worker.
- `raw_socket`: the plain socket under gevent's wrapper (gevent's `_sock`).
- `KEEPALIVE = 0`, gunicorn.conf.py's `keepalive`: one request per connection
  (the comment at KEEPALIVE says why).
- The hooks `post_worker_init` and `worker_exit` (gunicorn.conf.py names them):
  they read the worker's `alive`, its `wsgi` (the Flask app) and whether it is
  an `AsyncWorker`.
- `gunicorn.util.write_error(sock, status_int, reason, mesg)`: what the
  worker's `handle_error` calls to answer a request gunicorn itself refuses
  (its parser, its limits); replaced in each worker process by `write_error`,
  which answers JSON.
- gunicorn.conf.py's other settings, `control_socket_disable` (new in 27)
  among them; and `http_protocols` left at its default, HTTP/1.1 only (the
  handover writes an HTTP/1.1 head).

At start, gunicorn.conf.py calls `check_version`, which refuses (exits) under
any other major version than `WRITTEN_FOR`. Refuse rather than warn: a piece
above that no longer holds does not fail loudly, it hangs or garbles streams
(a keep-alive loop reading a socket the writer owns, a response written
twice), and a warning in a log is read after the damage. gunicorn is pinned,
so only a deliberate upgrade meets the refusal. To upgrade: check each piece
above against the new gunicorn's `workers/base_async.py`, `workers/ggevent.py`,
`http/wsgi.py` and `config.py`; run tests/unit/test_writer.py, tests/integration
(their streams go through gunicorn and this module) and the e2e suite; then set
`WRITTEN_FOR`.
"""

from __future__ import annotations

import gc
import json
import socket
from typing import Any

import gevent
import gunicorn
from gunicorn import util
from gunicorn.workers.base_async import ALREADY_HANDLED as ALREADY_HANDLED
from gunicorn.workers.base_async import AsyncWorker

WRITTEN_FOR = 27  # gunicorn's major version
SOCKET_KEY = "gunicorn.socket"
HANDOVER = "HERALD_HANDOVER"  # app.config key: the server honours the handover
HUB = "herald.hub"  # app.extensions key: the worker's hub, for the hooks

# One request per connection. A stream's connection is handed over to its
# writer (stream/handover.py) and must not be read for a next request; gunicorn
# 27's keep-alive loop would (it ignores a handled-elsewhere answer). The other
# endpoints (health checks, /stats, /metrics) lose nothing worth keeping.
KEEPALIVE = 0


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
        f"herald-stream: stream/server.py was written for gunicorn {WRITTEN_FOR}.x, not {found}. "
        "Check each piece its docstring lists against this gunicorn, run the stream tests, "
        "then set WRITTEN_FOR; or install the gunicorn of requirements.txt."
    )


def raw_socket(sock: Any) -> socket.socket:
    """The plain non-blocking socket under gevent's cooperative one (itself if none)."""
    return getattr(sock, "_sock", sock)  # type: ignore[no-any-return]


def post_worker_init(worker: Any) -> None:
    """Turn the handover on, and end every open stream as soon as the worker is told to stop.

    gunicorn's gevent worker only stops accepting on TERM and then waits for open
    requests; SSE streams would hold it until graceful_timeout and then be cut.
    Ending them at once lets browsers reconnect (to another replica) right away.
    """
    # An async worker honours ALREADY_HANDLED: stream connections are handed
    # over to their writers and no greenlet waits per stream (stream/handover.py).
    worker.wsgi.config[HANDOVER] = isinstance(worker, AsyncWorker)
    util.write_error = write_error  # in this worker process only

    # Everything loaded so far lives as long as the worker: keep it out of the
    # garbage collector's full passes, which otherwise pause every stream.
    gc.freeze()

    gevent.spawn(_end_streams_on_stop, worker)


def _end_streams_on_stop(worker: Any) -> None:
    while worker.alive:
        gevent.sleep(0.2)
    hub = worker.wsgi.extensions.get(HUB)
    if hub is not None:
        hub.shutdown()


def worker_exit(arbiter: Any, worker: Any) -> None:
    """End the streams still open (handed over, gunicorn does not wait for them)."""
    hub = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get(HUB)
    if hub is not None:
        hub.shutdown()  # a no-op when post_worker_init's watcher already did it
