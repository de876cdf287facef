"""The stream's response body detaches its client exactly once, in every case."""

from __future__ import annotations

from collections.abc import Iterator

from stream.app import Body


def frames(log: list[str]) -> Iterator[bytes]:
    try:
        yield b"one"
        yield b"two"
    finally:
        log.append("generator finally")


def test_close_without_reading_still_detaches() -> None:
    # A generator that never started runs no `finally` on close(): Body must.
    detached: list[str] = []
    body = Body(frames([]), lambda: detached.append("detach"))
    body.close()
    assert detached == ["detach"]


def test_close_after_reading_detaches_once_and_ends_the_frames() -> None:
    log: list[str] = []
    body = Body(frames(log), lambda: log.append("detach"))
    assert next(iter(body)) == b"one"
    body.close()
    body.close()
    assert log == ["generator finally", "detach"]


def test_frames_pass_through_unchanged() -> None:
    assert list(Body(frames([]), lambda: None)) == [b"one", b"two"]
