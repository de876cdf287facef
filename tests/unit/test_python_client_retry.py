"""The Python client's retry rule (clients/python): Retry-After wins, otherwise
exponential backoff with jitter, bounded, and the tries run out."""

from __future__ import annotations

import email.utils
from collections.abc import Generator
from pathlib import Path
from typing import cast

import httpx
import pytest
from herald_client import Event, subscribe
from herald_client._publish import MAX_RETRY_AFTER, _Retry, retry_after
from httpx_sse import EventSource

NOW = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()


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


# -- Retry-After, strictly (issue 16): ASCII digits or an HTTP-date, at most 5 minutes --


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("7", 7.0),
        (" 12 ", 12.0),
        ("300", 300.0),
        ("301", MAX_RETRY_AFTER),
        ("99999999999999999999", MAX_RETRY_AFTER),
        ("9" * 5000, MAX_RETRY_AFTER),  # int() refuses this many digits: never reached
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Sunday, 21-Oct-15 07:28:10 GMT", 10.0),
        ("Wed Oct 21 07:28:05 2015", 5.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        ("Wed, 21 Oct 2099 07:28:00 GMT", MAX_RETRY_AFTER),
    ],
)
def test_retry_after_valid_forms_are_bounded(value: str, seconds: float) -> None:
    assert retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "²",
        "٣",
        "\uff11\uff12",
        "-1",
        "+5",
        "1.5",
        "1e3",
        "5 s",
        "soon",
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "\x00",
    ],
)
def test_retry_after_anything_else_is_ignored(value: str | None) -> None:
    assert retry_after(value, now=NOW) is None


def test_a_hostile_retry_after_never_parks_the_publisher() -> None:
    retry = _Retry(attempts=5, max_delay=2.0)
    assert retry.next_delay(httpx.Response(503, headers={"Retry-After": "31536000"})) == MAX_RETRY_AFTER
    backoff = retry.next_delay(httpx.Response(503, headers={b"Retry-After": "²".encode()}))
    assert backoff is not None and backoff <= 2.0


def test_subscribe_survives_an_odd_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """'²' used to crash subscribe() (float('²') raises); now it backs off."""
    answers = iter(
        [
            httpx.Response(503, headers={b"Retry-After": "²".encode()}, json={"error": "x", "message": "x"}),
            httpx.Response(503, headers={"Retry-After": "99999999"}, json={"error": "x", "message": "x"}),
            httpx.Response(
                200, headers={"Content-Type": "text/event-stream"}, content=b'id: e-1\ndata: {"n":1}\n\n'
            ),
        ]
    )
    waits: list[float] = []
    monkeypatch.setattr("herald_client._subscribe.time.sleep", waits.append)
    client = httpx.Client(transport=httpx.MockTransport(lambda request: next(answers)))
    events = cast(Generator[Event, None, None], subscribe("http://herald.test", ["orders"], client=client))
    first = next(events)
    events.close()
    assert (first.id, first.data) == ("e-1", {"n": 1})
    assert len(waits) == 2
    assert waits[0] <= 30.0  # its own backoff
    assert MAX_RETRY_AFTER <= waits[1] <= MAX_RETRY_AFTER + 0.25  # bounded (plus jitter)


def test_the_client_requires_an_httpx_sse_that_keeps_unicode_separators() -> None:
    """httpx-sse < 0.4.2 split lines on U+2028/U+2029/U+0085: a forged `event:` line."""
    pyproject = (Path(__file__).resolve().parents[2] / "clients/python/pyproject.toml").read_text()
    assert '"httpx-sse>=0.4.2"' in pyproject
    body = 'data: {"a":"x\u2028event: forged\u0085id: 1"}\n\n'.encode()
    response = httpx.Response(200, headers={"Content-Type": "text/event-stream"}, content=body)
    (event,) = list(EventSource(response).iter_sse())
    assert event.event == "message" and event.id == ""
