"""Herald's Python client: publish events, subscribe with exact resume."""

from ._publish import AsyncPublisher, HeraldError, Publisher
from ._subscribe import Event, subscribe

__all__ = ["AsyncPublisher", "Event", "HeraldError", "Publisher", "subscribe"]
