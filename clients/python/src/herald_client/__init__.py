"""Herald's Python client: publish events, subscribe with exact resume, verify webhooks."""

from ._publish import AsyncPublisher, HeraldError, Publisher
from ._subscribe import Event, subscribe
from ._webhooks import WebhookVerificationError, verify_webhook

__all__ = [
    "AsyncPublisher",
    "Event",
    "HeraldError",
    "Publisher",
    "WebhookVerificationError",
    "subscribe",
    "verify_webhook",
]
