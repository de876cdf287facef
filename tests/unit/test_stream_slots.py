"""stream/slots.py: each replica on a host claims its own Unix socket for nginx, and a
slot comes free when the process holding it ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from stream import slots

STREAM_DIR = Path(__file__).resolve().parents[2] / "stream-service"
# Claims a slot in another process, says which, and holds it until killed.
HOLDER = """
import sys, time
from stream import slots
print(slots.claim(sys.argv[1], int(sys.argv[2])), flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def no_claim_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so that monkeypatch removes the variable again afterwards even
    # though claim() sets it: gunicorns that tests start later inherit os.environ.
    monkeypatch.setenv(slots.SLOT_ENV, "")
    monkeypatch.delenv(slots.SLOT_ENV)


def claim_afresh(directory: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """A claim as a new process would make it (the claim of this one forgotten)."""
    monkeypatch.delenv(slots.SLOT_ENV, raising=False)
    return slots.claim(str(directory), count)


def holder(directory: Path, count: int) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(count)],
        cwd=STREAM_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def test_replicas_take_the_first_free_slots_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [claim_afresh(tmp_path, 4, monkeypatch) for _ in range(3)] == [1, 2, 3]
    assert slots.current() == 3
    assert slots.socket_path(str(tmp_path), 3) == str(tmp_path / "stream-3.sock")


def test_a_process_keeps_its_slot_when_its_config_is_read_again(tmp_path: Path) -> None:
    first = slots.claim(str(tmp_path), 4)
    assert slots.claim(str(tmp_path), 4) == first == 1


def test_a_killed_replica_frees_its_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    process, held = holder(tmp_path, 2)
    try:
        assert held == 1
        assert claim_afresh(tmp_path, 2, monkeypatch) == 2
        with pytest.raises(slots.SlotError, match=r"all 2 stream slots .* STREAM_SLOTS"):
            claim_afresh(tmp_path, 2, monkeypatch)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    # No clean-up ran, yet the kernel let go of the lock: the slot is free again.
    assert claim_afresh(tmp_path, 2, monkeypatch) == 1


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(slots.SlotError, match=r"STREAM_SOCKET_DIR .* is not a directory"):
        slots.claim(str(tmp_path / "absent"), 8)
    assert os.environ.get(slots.SLOT_ENV) is None


@pytest.mark.parametrize("raw", ["0", "257", "", "8;", "1e2", "٣", "-1"])
def test_stream_slots_is_a_whole_number_from_1_to_256(raw: str) -> None:
    with pytest.raises(slots.SlotError, match="STREAM_SLOTS"):
        slots.parse_slots(raw)


@pytest.mark.parametrize(("raw", "value"), [("1", 1), ("8", 8), ("256", 256)])
def test_stream_slots_accepts(raw: str, value: int) -> None:
    assert slots.parse_slots(raw) == value
