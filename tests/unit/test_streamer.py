"""What a client's own greenlet sends: de-duplication, resets, the rest of a partial write."""

from __future__ import annotations

from stream.app import Streamer, select
from stream.config import Config
from stream.history import Position
from stream.hub import reset_frame
from stream.subscriber import CONTROL, RAW, Subscriber

EPOCH = b"0123456789ab"


def test_events_at_or_below_the_position_are_skipped() -> None:
    items = [(3, b"e3"), (4, b"e4"), (4, b"again"), (5, b"e5")]
    prefix, frames, epoch, last = select(items, EPOCH, 3)
    assert (prefix, frames, epoch, last) == (b"", [b"e4", b"e5"], EPOCH, 5)


def test_the_rest_of_a_partial_write_goes_first_as_is() -> None:
    prefix, frames, _, last = select([(RAW, b"tail\r\n"), (8, b"e8")], EPOCH, 7)
    assert prefix == b"tail\r\n" and frames == [b"e8"] and last == 8


def test_a_reset_to_a_new_epoch_lets_its_small_numbers_through() -> None:
    reset = reset_frame("epoch_changed", Position("ffffffffffff", 0))
    items = [(CONTROL, reset), (1, b"new1")]
    _, frames, epoch, last = select(items, EPOCH, 900)
    assert frames == [reset, b"new1"] and epoch == b"ffffffffffff" and last == 1


def test_a_reset_to_the_epoch_the_client_already_has_is_dropped() -> None:
    reset = reset_frame("epoch_changed", Position(EPOCH.decode(), 5))
    _, frames, _, last = select([(CONTROL, reset), (6, b"e6")], EPOCH, 5)
    assert frames == [b"e6"] and last == 6


def test_the_yielding_path_writes_queued_events_once_then_ends_when_closed() -> None:
    # The path used when no gunicorn socket is available (no direct writes).
    streamer = Streamer(Config(), hub=None, history=None)  # type: ignore[arg-type]
    sub = Subscriber(["a"], 1 << 20)
    sub.push(1, b"old")
    sub.push(2, b"e2")
    sub.push(3, b"e3")
    body = streamer._live(sub, (EPOCH, 1), None)
    assert next(body) == b"e2e3"
    sub.close("shutdown")
    assert list(body) == []
