"""One POST of a webhook to one endpoint, signed (Standard Webhooks), and what came of it.

Signing is the `standardwebhooks` package's: `webhook-signature` holds one
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` per secret (several while
rotating), and `webhook-timestamp` is the time of this attempt, so a receiver
can refuse an old capture replayed.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from dataclasses import dataclass

import gevent
import urllib3
from standardwebhooks.webhooks import Webhook

from .config import Config, Endpoint

USER_AGENT = "Herald-Webhooks/1"
MAX_RETRY_AFTER = 3600.0  # seconds; longer waits are cut to this (and to the retry window)
_DIGITS = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: taken (2xx), or why not, and any Retry-After."""

    ok: bool
    status: int | None  # None: no answer (refused, timed out, reset)
    reason: str
    retry_after: float | None = None


class Sender:
    """POSTs bodies to endpoints over pooled connections (urllib3), signed with every secret."""

    def __init__(self, config: Config) -> None:
        self._signers = [Webhook(secret) for secret in config.secrets]
        timeout = config.timeout_seconds
        self._total = timeout + 0.5
        # No retries here: retrying is the lane's job (backoff, window, dead letters).
        self._pool = urllib3.PoolManager(
            num_pools=max(4, len(config.endpoints)),
            maxsize=16,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
        )

    def headers(self, webhook_id: str, payload: bytes, now: float | None = None) -> dict[str, str]:
        """The request's headers, signed now."""
        at = datetime.datetime.fromtimestamp(int(time.time() if now is None else now), datetime.UTC)
        signatures = " ".join(s.sign(webhook_id, at, payload) for s in self._signers)
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures,
        }

    def post(self, endpoint: Endpoint, webhook_id: str, payload: bytes) -> Outcome:
        """One attempt, over within WEBHOOK_TIMEOUT_SECONDS (plus a little) whatever
        the endpoint does: urllib3's timeouts bound each connect and each read, this
        the whole (the lease rule, leases.py, counts on it). Never raises for the
        endpoint's or the network's failures."""
        with gevent.Timeout(self._total, False):
            return self._post(endpoint, webhook_id, payload)
        return Outcome(False, None, "timed out")

    def _post(self, endpoint: Endpoint, webhook_id: str, payload: bytes) -> Outcome:
        try:
            answer = self._pool.request(
                "POST",
                endpoint.url,
                body=payload,
                headers=self.headers(webhook_id, payload),
                redirect=False,
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            return Outcome(False, None, _reason(exc))
        try:
            # Read a little of the body only, so a connection can be reused; the rest is dropped.
            answer.read(4096)
        except urllib3.exceptions.HTTPError:
            pass
        finally:
            answer.release_conn()
        if 200 <= answer.status < 300:
            return Outcome(True, answer.status, "taken")
        return Outcome(
            False, answer.status, f"HTTP {answer.status}", retry_after(answer.headers.get("retry-after"))
        )


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (digits or an HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.match(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    wait = when.timestamp() - (time.time() if now is None else now)
    return min(max(wait, 0.0), MAX_RETRY_AFTER)


def _reason(exc: Exception) -> str:
    """A failure's kind, without the URL (which may carry a credential)."""
    if isinstance(exc, urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection refused or unreachable"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return "connection broken"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return "TLS error"
    return type(exc).__name__
