"""Publishing: `Publisher` and `AsyncPublisher`, with retries that never publish twice."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

import httpx

# A retry is safe for these: the request carries the same Idempotency-Key.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

EventSpec = tuple[str, Any, "str | None"]

# The longest wait a Retry-After can impose: a hostile or broken proxy must not
# park a publisher or a subscriber for hours.
MAX_RETRY_AFTER = 300.0
_SECONDS_RE = re.compile(r"[0-9]+")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header, at most MAX_RETRY_AFTER; None
    when it is absent or not valid (then the caller backs off on its own).

    RFC 9110: ASCII digits (delay-seconds), or an HTTP-date. Nothing else is
    read: not `'²'` (which str.isdigit() accepts), not a sign, not a fraction."""
    if value is None:
        return None
    value = value.strip(" \t")
    if _SECONDS_RE.fullmatch(value):
        # int() of a long string is slow (and refused beyond 4300 digits).
        return MAX_RETRY_AFTER if len(value) > 6 else min(MAX_RETRY_AFTER, float(int(value)))
    if not value.isascii() or not 12 <= len(value) <= 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime's form, or "-0000": both mean GMT here
        when = when.replace(tzinfo=datetime.timezone.utc)  # noqa: UP017 (the client runs on 3.10)
    wait = when.timestamp() - (time.time() if now is None else now)
    return min(MAX_RETRY_AFTER, max(0.0, wait))


class HeraldError(Exception):
    """Herald refused the request (4xx), or kept failing until the retries ran out."""

    def __init__(self, status: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


def _event(channel: str, data: Any, event: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel, "data": data}
    if event is not None:
        body["event"] = event
    return body


def _error(response: httpx.Response) -> HeraldError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return HeraldError(response.status_code, str(body.get("error")), str(body.get("message")), body)
    return HeraldError(response.status_code, "http_error", response.text[:200], body)


class _Retry:
    """When to try again: exponential backoff with jitter, or the server's Retry-After."""

    def __init__(self, attempts: int, max_delay: float) -> None:
        self.attempts = attempts
        self.max_delay = max_delay
        self.done = 0

    def next_delay(self, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next try, or None when the tries are used up."""
        self.done += 1
        if self.done >= self.attempts:
            return None
        if response is not None:
            after = retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return after
        backoff: float = min(self.max_delay, 0.2 * 2.0 ** (self.done - 1))
        return backoff * random.uniform(0.5, 1.0)


class _Base:
    def __init__(self, base_url: str, token: str | None, attempts: int, max_delay: float) -> None:
        self.url = base_url.rstrip("/") + "/publish"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.attempts = attempts
        self.max_delay = max_delay

    @staticmethod
    def _ids(answer: dict[str, Any], batch: bool) -> list[str]:
        return [e["id"] for e in answer["events"]] if batch else [answer["id"]]

    def _request(self, body: Any) -> tuple[dict[str, str], _Retry]:
        # One key per call, kept by every retry: Herald stores the call once.
        headers = {**self.headers, "Idempotency-Key": uuid.uuid4().hex}
        return headers, _Retry(self.attempts, self.max_delay)

    def _settle(self, response: httpx.Response | None, batch: bool) -> list[str] | None:
        """The ids of a stored call; None to try again; HeraldError for a refusal.

        No answer (connection refused or reset, timeout) is retried: the same
        key makes that safe."""
        if response is None:
            return None
        if response.status_code < 300:
            return self._ids(response.json(), batch)
        if response.status_code not in RETRY_STATUSES:
            raise _error(response)
        return None

    @staticmethod
    def _wait(retry: _Retry, response: httpx.Response | None) -> float:
        """How long to wait before the next try; HeraldError when the tries are used up."""
        delay = retry.next_delay(response)
        if delay is not None:
            return delay
        if response is not None:
            raise _error(response)
        raise HeraldError(0, "unreachable", f"Herald did not answer after {retry.done} tries")


class Publisher(_Base):
    """Publishes events to Herald's `POST /publish`.

    Connection errors, timeouts, 429 and 5xx answers are retried (up to
    `attempts` tries), honouring `Retry-After`; each call sends one
    `Idempotency-Key` with every try, so a retry never stores an event twice.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        attempts: int = 6,
        max_delay: float = 10.0,
        client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, token, attempts, max_delay)
        self._client = client or httpx.Client(timeout=timeout)

    def publish(self, channel: str, data: Any, event: str | None = None) -> str:
        """Publish one event; return its id."""
        return self._post(_event(channel, data, event), batch=False)[0]

    def publish_many(self, events: Iterable[EventSpec]) -> list[str]:
        """Publish a batch of (channel, data, event or None), in order; return their ids."""
        return self._post([_event(*e) for e in events], batch=True)

    def _post(self, body: Any, batch: bool) -> list[str]:
        headers, retry = self._request(body)
        while True:
            try:
                response: httpx.Response | None = self._client.post(self.url, json=body, headers=headers)
            except httpx.TransportError:
                response = None
            ids = self._settle(response, batch)
            if ids is not None:
                return ids
            time.sleep(self._wait(retry, response))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(_Base):
    """`Publisher` for asyncio: the same retries, with `await`."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        attempts: int = 6,
        max_delay: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, token, attempts, max_delay)
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def publish(self, channel: str, data: Any, event: str | None = None) -> str:
        """Publish one event; return its id."""
        return (await self._post(_event(channel, data, event), batch=False))[0]

    async def publish_many(self, events: Iterable[EventSpec]) -> list[str]:
        """Publish a batch of (channel, data, event or None), in order; return their ids."""
        return await self._post([_event(*e) for e in events], batch=True)

    async def _post(self, body: Any, batch: bool) -> list[str]:
        headers, retry = self._request(body)
        post = self._client.post
        while True:
            try:
                response: httpx.Response | None = await post(self.url, json=body, headers=headers)
            except httpx.TransportError:
                response = None
            ids = self._settle(response, batch)
            if ids is not None:
                return ids
            await asyncio.sleep(self._wait(retry, response))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
