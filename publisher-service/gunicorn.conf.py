# Twins: on_starting() and child_exit() here and in stream-service/gunicorn.conf.py
# are identical: change both together (tests/unit/test_conventions.py checks it).
"""gunicorn settings for the publisher; each can be overridden from the environment."""

import os
import tempfile

# Before anything imports prometheus_client: every worker (forked later) then
# keeps its metrics in this directory, and /metrics adds them up.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="herald-metrics-"))

# Everything that depends on gunicorn's version is in publisher/server.py, the
# worker class among them. It refuses to start under another major version of
# gunicorn, and says what to check.
from publisher.server import check_version

check_version()

wsgi_app = "publisher.app:create_app()"
bind = os.environ.get("BIND", "0.0.0.0:8000")
# gunicorn's gevent worker, with one write per answer, which also closes idle
# keep-alive connections when it stops (publisher/server.py).
worker_class = "publisher.server.Worker"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# Publishes are short; a worker that blocks this long is stuck.
timeout = 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
# nginx keeps idle connections to the publisher for reuse for up to 60 s
# (keepalive_timeout of its upstream block). gunicorn keeps them longer, so it
# is always nginx that closes an idle connection, never gunicorn just as nginx
# sends a publish on it. Idle connections do not hold up a graceful stop: the
# worker closes them when it stops.
keepalive = 75
accesslog = "-" if os.environ.get("ACCESS_LOG", "0") == "1" else None
# No query string and no referrer (either may hold a subscribe token; the JSON
# log handler redacts tokens anyway, publisher.logs.RedactFilter); nginx's access
# log has the query, redacted.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}i)s'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Do not preload: Redis clients must be created after the fork and gevent's patching.
preload_app = False
# gunicorn 27's control socket lives in the home directory; the services have none
# (publisher/server.py lists what else depends on gunicorn's version).
control_socket_disable = True

# JSON log lines (with the request id) for gunicorn and the app.
logconfig_dict = __import__("publisher.logs", fromlist=["log_config"]).log_config(
    loglevel, accesslog is not None
)
# ...and no per-request work for an access log that is off.
logger_class = "publisher.logs.GunicornLogger"


def on_starting(server):  # type: ignore[no-untyped-def]
    """Start with an empty metrics directory (values of an earlier run are stale)."""
    import glob

    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Forget the live gauges of a worker that is gone."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
