"""gunicorn settings for the publisher; each can be overridden from the environment."""

import os

wsgi_app = "publisher.app:create_app()"
bind = os.environ.get("BIND", "0.0.0.0:8000")
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
# Publishes are short; a worker that blocks this long is stuck.
timeout = 30
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "10"))
keepalive = 75  # above nginx's upstream keepalive_timeout (60 s)
accesslog = "-" if os.environ.get("ACCESS_LOG", "0") == "1" else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# Do not preload: Redis clients must be created after the fork and gevent's patching.
preload_app = False
