# Twins: init_app() here and in publisher-service/publisher/metrics.py are
# identical: change both together (tests/unit/test_conventions.py checks it).
"""Prometheus metrics of the stream service, correct under several gunicorn workers.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before anything imports
prometheus_client; GET /metrics (internal network only, nginx does not route
it) sums the values of all workers, live gauges of running workers only.
"""

from __future__ import annotations

import os

from flask import Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)

CLIENTS = Gauge("herald_stream_clients", "Open SSE streams.", multiprocess_mode="livesum")
DELIVERED = Counter(
    "herald_events_delivered_total", "Events written or queued to live clients (one per client)."
)
RECEIVED = Counter("herald_events_received_total", "Events received from Redis Pub/Sub.")
DROPPED_SLOW = Counter("herald_slow_clients_dropped_total", "Clients dropped for falling behind.")
RESUMES = Counter("herald_resumes_total", "Streams opened with a last event id.")
RESETS = Counter("herald_resets_total", "Reset events sent, by reason.", ["reason"])
RECONNECTS = Counter("herald_redis_reconnects_total", "Reconnections of the Pub/Sub connection.")


def this_worker(counter: Counter) -> int:
    """This worker's own count (every label together): what /stats reports.

    The counters are the one record of what happened; /metrics adds up every
    worker's values, /stats shows the answering worker's.
    """
    return int(sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))


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
