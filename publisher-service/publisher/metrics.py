# Twins: init_app() here and in stream-service/stream/metrics.py are
# identical: change both together (tests/unit/test_conventions.py checks it).
"""Prometheus metrics of the publisher, correct under several gunicorn workers.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client, so every worker writes its values there and GET /metrics
(served on the internal network only; nginx does not route it) sums them.
"""

from __future__ import annotations

import os

from flask import Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

EVENTS_PUBLISHED = Counter("herald_events_published_total", "Events stored and announced.")
PUBLISH_REQUESTS = Counter("herald_publish_requests_total", "Publish requests by status.", ["status"])
PUBLISH_SECONDS = Histogram(
    "herald_publish_duration_seconds",
    "Time to validate and store one publish request.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


# One child per status code seen, looked up once (labels() costs as much as inc()).
_requests_by_status: dict[int, Counter] = {}


def publish_done(status: int, seconds: float) -> None:
    """Count one publish request with its status and duration."""
    child = _requests_by_status.get(status)
    if child is None:
        child = _requests_by_status[status] = PUBLISH_REQUESTS.labels(str(status))
    child.inc()
    PUBLISH_SECONDS.observe(seconds)


def init_app(app: Flask) -> None:
    """GET /metrics in the Prometheus text format."""

    @app.get("/metrics")
    def metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest()
        return Response(body, mimetype=CONTENT_TYPE_LATEST)
