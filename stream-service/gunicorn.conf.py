# Twins: on_starting() and child_exit() here and in publisher-service/gunicorn.conf.py
# are identical: change both together (tests/unit/test_conventions.py checks it).
"""gunicorn settings for the stream service; each can be overridden from the environment."""

import os
import tempfile

# gevent's greenlet-tree tracking costs memory per stream and is only for debugging.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")

# Before anything imports prometheus_client: every worker (forked later) then
# keeps its metrics in this directory, and /metrics adds them up.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="herald-metrics-"))

# Everything that depends on gunicorn's version is in stream/server.py, the hooks
# post_worker_init (the handover's switch, the stop of open streams) and
# worker_exit among them: gunicorn finds them here by name. It refuses to start
# under another major version of gunicorn, and says what to check.
from stream.server import KEEPALIVE, check_version, post_worker_init, worker_exit  # noqa: F401

check_version()

wsgi_app = "stream.app:create_app()"
# Comma-separated addresses. TCP 8000 carries the health checks, /stats and
# /metrics (and streams, where nginx is not on the same host).
bind = [part.strip() for part in os.environ.get("BIND", "0.0.0.0:8000").split(",") if part.strip()]
# nginx on the same host reaches this replica over a Unix socket on a volume they
# share: half the CPU per event of loopback TCP, for this worker's send and for
# nginx's receive (docs/benchmark.md, "nginx to the stream workers").
if os.environ.get("STREAM_SOCKET_DIR"):
    from stream import slots

    try:
        _count = slots.parse_slots(os.environ.get("STREAM_SLOTS", "8"))
        _slot = slots.claim(os.environ["STREAM_SOCKET_DIR"], _count)
    except slots.SlotError as error:
        raise SystemExit(f"herald-stream: {error}") from None
    bind.append("unix:" + slots.socket_path(os.environ["STREAM_SOCKET_DIR"], _slot))
# Unix sockets are created with mode 0777 minus this: nginx's workers (another
# user, in another container) must be able to connect.
umask = 0
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# The greenlet pool must be larger than MAX_CONNECTIONS, so that the service itself
# can answer 503 (with Retry-After) to the connection over the limit.
worker_connections = int(os.environ.get("MAX_CONNECTIONS", "10000")) + 100
# For gevent workers this is a liveness check of the worker, not a request timeout.
timeout = 30
# Streams never end by themselves: on stop the app ends them (see post_worker_init below),
# and gunicorn waits this long for them to close. Keep compose's stop_grace_period above it.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
# One request per connection: a handed-over stream's socket must not be read
# for a next request (stream/server.py says why).
keepalive = KEEPALIVE
# Never recycle stream workers: recycling cuts every open stream.
max_requests = 0
accesslog = "-" if os.environ.get("ACCESS_LOG", "0") == "1" else None
# No query string and no referrer (either may hold a subscribe token; the JSON
# log handler redacts tokens anyway, stream.logs.RedactFilter); nginx's access
# log has the query, redacted.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}i)s'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Do not preload: Redis clients must be created after the fork and gevent's patching.
preload_app = False
# gunicorn 27's control socket lives in the home directory; the services have none.
control_socket_disable = True


# JSON log lines (with the request id) for gunicorn and the app.
logconfig_dict = __import__("stream.logs", fromlist=["log_config"]).log_config(
    loglevel, accesslog is not None
)
# ...and no per-request work for an access log that is off.
logger_class = "stream.logs.GunicornLogger"


def on_starting(server):  # type: ignore[no-untyped-def]
    """Start with an empty metrics directory (values of an earlier run are stale)."""
    import glob

    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Forget the live gauges of a worker that is gone."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
