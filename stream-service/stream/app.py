"""The stream service: `GET /stream` turns Redis subscriptions into Server-Sent Events.

`create_app` only wires the pieces together: the routes are in views.py, the
JSON errors in errors.py, the handover of a stream's connection to its writer
in handover.py, and what depends on gunicorn in server.py.
"""

from __future__ import annotations

from flask import Flask

from . import cors, errors, handover, logs, metrics, server, views
from .config import Config
from .history import History
from .hub import Hub
from .topology import Topology
from .writer import Limits


def create_app(config: Config | None = None) -> Flask:
    """Build the stream app. The hub connects to Redis on first use, after the fork."""
    config = config or Config.from_env()
    app = Flask(__name__)
    logs.init_app(app)
    metrics.init_app(app)
    topology = Topology(config)
    history = History(topology.client, config.partitions)
    hub = Hub(config, history, topology)
    app.extensions[server.HUB] = hub
    handover.init_app(app)
    limits = Limits(config.client_buffer_bytes, config.client_buffer_max_bytes, config.client_buffer_seconds)
    cors.init_app(app, config.cors_origins, ("/stream", "/history"))
    views.init_app(app, views.Service(config, hub, history, topology, limits))
    errors.init_app(app, config.retry_after_seconds)
    return app
