"""The Python client's retry rule (clients/python): Retry-After wins, otherwise
exponential backoff with jitter, bounded, and the tries run out."""

from __future__ import annotations

import httpx
from herald_client._publish import _Retry


def test_retry_after_is_honoured_exactly() -> None:
    retry = _Retry(attempts=5, max_delay=2.0)
    assert retry.next_delay(httpx.Response(503, headers={"Retry-After": "7"})) == 7.0


def test_backoff_doubles_with_jitter_and_stays_below_the_bound() -> None:
    retry = _Retry(attempts=20, max_delay=2.0)
    delays = [retry.next_delay(None) for _ in range(10)]
    assert all(d is not None for d in delays)
    bounds = [min(2.0, 0.2 * 2**i) for i in range(10)]
    for delay, bound in zip(delays, bounds, strict=True):
        assert delay is not None and bound * 0.5 <= delay <= bound
    assert max(d for d in delays if d is not None) <= 2.0


def test_the_tries_run_out() -> None:
    retry = _Retry(attempts=3, max_delay=1.0)
    assert retry.next_delay(None) is not None
    assert retry.next_delay(httpx.Response(503)) is not None
    assert retry.next_delay(None) is None
