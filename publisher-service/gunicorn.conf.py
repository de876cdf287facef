"""gunicorn settings for the publisher; each can be overridden from the environment."""

import os
import tempfile

# Before anything imports prometheus_client: every worker (forked later) then
# keeps its metrics in this directory, and /metrics adds them up.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="herald-metrics-"))

wsgi_app = "publisher.app:create_app()"
bind = os.environ.get("BIND", "0.0.0.0:8000")
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# Publishes are short; a worker that blocks this long is stuck.
timeout = 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
# nginx reaches the services through a variable proxy_pass, which never reuses
# upstream connections; a short keep-alive bounds how long an idle client
# connection can hold up a graceful stop.
keepalive = 5
accesslog = "-" if os.environ.get("ACCESS_LOG", "0") == "1" else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Do not preload: Redis clients must be created after the fork and gevent's patching.
preload_app = False
# gunicorn 27's control socket lives in the home directory; the services have none.
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
