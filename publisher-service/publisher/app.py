"""The publisher: `POST /publish` validates events and stores them in Redis.

create_app wires the parts together; the routes are in views.py, their error
answers in errors.py (docs/publisher-service.md).
"""

from __future__ import annotations

from flask import Flask

from . import cors, errors, logs, metrics, views
from .access import Access
from .config import Config
from .store import EventStore


def create_app(config: Config | None = None) -> Flask:
    """Build the publisher app; Redis is reached lazily, after gunicorn forks."""
    config = config or Config.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = None  # checked by parse_events, with a JSON error
    logs.init_app(app)
    metrics.init_app(app)
    access = Access(config)
    # A preflight is refused as the request would be (publisher/access.py).
    cors.init_app(app, config.cors_origins, access.check_origin)
    store = EventStore.from_config(config)
    app.extensions["herald.store"] = store
    views.init_app(app, views.Parts(config, access, store))
    errors.init_app(app, config)
    return app
