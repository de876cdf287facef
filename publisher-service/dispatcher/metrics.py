"""The dispatcher's Prometheus metrics, served at /metrics (service.py).

Counters are labelled by endpoint: its position in WEBHOOK_URL, never the URL
(which may carry a credential).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

SENT = Counter("herald_webhook_events_sent", "Events an endpoint took (2xx)", ["endpoint"], registry=REGISTRY)
FAILED = Counter(
    "herald_webhook_attempts_failed",
    "POSTs that were not taken (non-2xx, timeout, refused)",
    ["endpoint"],
    registry=REGISTRY,
)
RETRIED = Counter(
    "herald_webhook_retries", "POSTs tried again after a failure", ["endpoint"], registry=REGISTRY
)
DEAD = Counter(
    "herald_webhook_events_dead_lettered",
    "Events given up after the retry window",
    ["endpoint"],
    registry=REGISTRY,
)
DROPPED = Counter(
    "herald_webhook_events_dropped",
    "Events trimmed from a lane before delivery (no dispatcher drained it for too long)",
    ["endpoint"],
    registry=REGISTRY,
)
LANES = Gauge("herald_webhook_lanes_held", "Lanes this dispatcher holds", registry=REGISTRY)
OLDEST = Gauge(
    "herald_webhook_oldest_undelivered_seconds",
    "Age of the oldest event not yet taken, over the lanes this dispatcher holds",
    registry=REGISTRY,
)


def watch_oldest(heads: Callable[[], Iterable[int | None]]) -> None:
    """OLDEST reads, when scraped, the creation times (ms) of the events each lane waits on."""

    def oldest() -> float:
        times = [t for t in heads() if t is not None]
        return 0.0 if not times else max(0.0, time.time() - min(times) / 1000)

    OLDEST.set_function(oldest)
