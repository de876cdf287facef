"""The webhook dispatcher: sends the occupancy events the stream service writes
to Redis (occupancy.py) to the operator's endpoints, signed, at least once and
in order per channel (docs/webhooks.md). It runs from the publisher's image as
a process of its own: `python -m dispatcher`."""
