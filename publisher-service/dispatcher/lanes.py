"""Sending one lane's events to one endpoint, in order, at least once.

Each endpoint is a consumer group on every lane (named by its URL). The
dispatcher that holds a lane (leases.py) runs one Delivery per endpoint: it
reads the group's entries in order, POSTs them (one event, or a batch), and
acknowledges them once the endpoint took them (2xx), or once they went to the
dead letters at the end of the retry window. Nothing is acknowledged before, so
a dispatcher that dies between a POST and its acknowledgement leaves the entry
pending; the next holder claims it (XAUTOCLAIM) and sends it again, with the
same webhook-id. A lane's events go out one POST at a time: a channel's events
are always in one lane, so they reach each endpoint in the order they happened.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import gevent
import gevent.event
import redis

from . import metrics
from .config import Config, Endpoint
from .contract import group_name, numbers_read_key
from .deadletters import bury
from .events import Event, body, from_entry
from .leases import Client, Lease
from .occupancy import lane_key
from .sender import Outcome, Sender

log = logging.getLogger("herald.dispatcher")

# How long a read waits for new entries: an idle lane costs Redis one read per
# this (a stop does not wait for it: an idle reader is simply killed).
READ_BLOCK_MS = 10000
ERROR_BACKOFF_MAX = 30.0  # seconds between retries after Redis errors, at most
CLAIM_COUNT = 100
FIRST_BACKOFF = 1.0  # seconds, doubled per failure up to WEBHOOK_BACKOFF_MAX_SECONDS


class LeaseShort(Exception):
    """The lane's lease has too little time left to start a POST (not renewed of late)."""


def backoff(failures: int, most: float, retry_after: float | None) -> float:
    """Seconds to wait after `failures` failed attempts: exponential, half of it
    jittered (so retries of many lanes spread out), at least any Retry-After."""
    ceiling = min(most, FIRST_BACKOFF * 2 ** (failures - 1))
    wait: float = ceiling / 2 + random.uniform(0, ceiling / 2)
    return wait if retry_after is None else max(wait, retry_after)


class Delivery:
    """One endpoint's consumer of one lane, while this dispatcher holds the lane."""

    def __init__(
        self,
        clients: tuple[Client, Client],
        sender: Sender,
        config: Config,
        where: tuple[int, int],
        endpoint: Endpoint,
        me: str,
        lease: Lease,
        stop: gevent.event.Event,
    ) -> None:
        self._client, self._reader = clients  # commands; the blocking reads of new entries
        self._sender = sender
        self._config = config
        self.partition, self.lane = where
        self._key = lane_key(*where)
        self._endpoint = endpoint
        self.group = group_name(endpoint.url)
        self._pending = True  # this consumer may hold unacknowledged entries: read those first
        # The number of the last event this group read (occupancy.numbers_key):
        # a jump in the numbers is what the lane's cap trimmed before it was read.
        self._number: int | None = None
        self._read_field = f"{self.group}:{self.lane}"
        self._me = me
        self._lease = lease
        self._stop = stop
        self.head_ms: int | None = None  # creation time of the event being sent (metrics.OLDEST)
        self.reading = False  # waiting on Redis for new entries: safe to kill

    def run(self) -> None:
        """Deliver until told to stop or the lease runs short; Redis errors are waited out."""
        prepared = False
        errors = 0
        while not self._stop.is_set():
            try:
                if not prepared:
                    self._prepare()
                    prepared = True
                events = self._next()
                if events:
                    self._deliver(events)
                errors = 0
            except LeaseShort:
                # Until it is renewed; if it was lost, the lane is stopped (service.py).
                while not self._stop.is_set() and self._lease.remaining() <= self._config.timeout_seconds + 1:
                    self._stop.wait(0.1)
            except (redis.RedisError, OSError) as exc:
                # Backing off, jittered: a lost node must not bring every lane's
                # reconnection (and DNS lookup) at once, every second.
                errors += 1
                wait = backoff(errors, ERROR_BACKOFF_MAX, None)
                log.warning(
                    "lane %s/%s: Redis error (%s); retrying in %.1f s", self.partition, self.lane, exc, wait
                )
                self._pending = True  # an acknowledgement may have failed
                self._stop.wait(wait)
            finally:
                self.reading = False
        self.head_ms = None

    def _prepare(self) -> None:
        """Create the group (from the lane's first entry), and claim every entry
        a former holder read and did not acknowledge."""
        try:
            self._client.xgroup_create(self._key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        known = self._client.hget(numbers_read_key(self.partition), self._read_field)
        self._number = int(known) if known is not None else None
        start = "0-0"
        while True:
            start, _claimed, deleted = self._client.xautoclaim(
                self._key, self.group, self._me, min_idle_time=0, start_id=start, count=CLAIM_COUNT
            )
            self._dropped(deleted)
            if _text(start) == "0-0":
                return

    def _next(self) -> list[Event]:
        """This consumer's pending entries first (after a takeover or a failed
        acknowledgement), else new ones, waiting up to READ_BLOCK_MS."""
        count = self._config.batch_max
        entries = self._read("0", count, None, self._client) if self._pending else []
        if not entries:
            self._pending = False
            self.reading = True
            try:
                entries = self._read(">", count, READ_BLOCK_MS, self._reader)
            finally:
                self.reading = False
            self._count_gaps(entries)
        events, done = [], []
        for entry, fields in entries:
            entry = _text(entry)
            if fields is None:  # trimmed from the lane while pending
                self._dropped([entry])
                continue
            try:
                event = from_entry(self.partition, self.lane, entry, fields)
            except (KeyError, ValueError, UnicodeDecodeError):
                log.error("lane %s/%s: malformed entry %s skipped", self.partition, self.lane, entry)
                done.append(entry)
                continue
            if event.endpoint is not None and event.endpoint != self.group:
                done.append(entry)  # a replay for another endpoint
            else:
                events.append(event)
        if done:
            self._client.xack(self._key, self.group, *done)
        return events

    def _count_gaps(self, entries: list[tuple[Any, Any]]) -> None:
        """New entries, in order: events numbered past the last one read plus one were
        trimmed unread. The last number is kept in Redis for the lane's next holder."""
        last = self._number
        for _entry, fields in entries:
            number = _number(fields) if fields else None
            if number is None:
                continue  # a replayed event: not numbered
            if self._number is not None and number > self._number + 1:
                self.dropped(number - self._number - 1)
            self._number = number
        if self._number != last:
            self._client.hset(numbers_read_key(self.partition), self._read_field, str(self._number))

    def _read(self, start: str, count: int, block: int | None, client: Client) -> list[tuple[Any, Any]]:
        answer: Any = client.xreadgroup(self.group, self._me, {self._key: start}, count=count, block=block)
        if not answer:
            return []
        if isinstance(answer, dict):  # RESP3
            return list(next(iter(answer.values()))[0])
        return list(answer[0][1])

    def _deliver(self, events: list[Event]) -> None:
        """POST until taken, or until the retry window is over (then the dead letters)."""
        config, label = self._config, self._endpoint.label
        self.head_ms = events[0].created_ms
        webhook_id, payload = body(events, batched=config.batch_max > 1)
        failures = 0
        while True:
            if self._lease.remaining() <= config.timeout_seconds + 1:
                raise LeaseShort
            outcome = self._sender.post(self._endpoint, webhook_id, payload)
            if outcome.ok:
                self._client.xack(self._key, self.group, *(e.entry for e in events))
                metrics.SENT.labels(label).inc(len(events))
                self.head_ms = None
                return
            failures += 1
            metrics.FAILED.labels(label).inc()
            wait = backoff(failures, config.backoff_max_seconds, outcome.retry_after)
            age = time.time() - self.head_ms / 1000
            if age + wait > config.retry_seconds:
                self._bury(events, outcome, failures)
                return
            log.info(
                "webhook %s to endpoint %s: %s; retrying in %.1f s",
                webhook_id,
                self._endpoint.shown,
                outcome.reason,
                wait,
            )
            metrics.RETRIED.labels(label).inc()
            if self._stop.wait(wait):
                self._pending = True
                return  # stopping: left pending, for whoever holds the lane next

    def _bury(self, events: list[Event], outcome: Outcome, failures: int) -> None:
        bury(self._client, self.partition, self.lane, self.group, events, outcome.reason, failures)
        metrics.DEAD.labels(self._endpoint.label).inc(len(events))
        self.head_ms = None
        log.warning(
            "webhook %s to endpoint %s: %s after %d attempts over the retry window; "
            "%d event(s) moved to the dead letters (python -m dispatcher dead-letters)",
            events[0].id,
            self._endpoint.shown,
            outcome.reason,
            failures,
            len(events),
        )

    def _dropped(self, entries: list[Any]) -> None:
        """Pending entries trimmed from the lane before this endpoint took them: acknowledged and counted."""
        if entries:
            self._client.xack(self._key, self.group, *entries)
            self.dropped(len(entries))

    def dropped(self, count: int) -> None:
        """`count` events of this lane will never reach this endpoint: counted and logged."""
        metrics.DROPPED.labels(self._endpoint.label).inc(count)
        log.error(
            "lane %s/%s: %d event(s) for endpoint %s were trimmed before delivery "
            "(the lane was not drained for too long); resync with GET /channels?occupied=true",
            self.partition,
            self.lane,
            count,
            self._endpoint.shown,
        )


def _number(fields: dict[bytes, bytes]) -> int | None:
    raw = fields.get(b"n")
    return int(raw) if raw is not None and raw.isdigit() else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
