"""Which of nginx's stream sockets this replica serves (docs/scaling.md, "nginx to the stream workers").

nginx reaches the stream replicas of its host over Unix sockets on a volume
they share, STREAM_SOCKET_DIR/stream-<n>.sock for n in 1..STREAM_SLOTS, listed
in its upstream (nginx/entrypoint.sh); a socket nobody serves is refused at
once and skipped. Each replica claims the first free slot by taking an
exclusive flock on STREAM_SOCKET_DIR/stream-<n>.lock, which gunicorn's master
holds for its whole life: the kernel releases it when the process ends,
however it ends, so a restarted or new replica finds it free. gunicorn then
binds the slot's socket, replacing a file a killed replica left behind.

Runs in gunicorn's master, from gunicorn.conf.py, before anything is forked.
"""

from __future__ import annotations

import fcntl
import os
import re

# Set once a slot is claimed: gunicorn may read its config file again in the same
# process, and the workers (forked) read it for /stats.
SLOT_ENV = "HERALD_STREAM_SLOT"
MAX_SLOTS = 256


class SlotError(RuntimeError):
    """No slot could be claimed; the message says why and what to change."""


def parse_slots(raw: str) -> int:
    """STREAM_SLOTS: how many sockets nginx lists, 1..256 (the same value as nginx's)."""
    if not re.fullmatch(r"[0-9]{1,3}", raw.strip()) or not 1 <= int(raw) <= MAX_SLOTS:
        raise SlotError(f"STREAM_SLOTS must be a whole number from 1 to {MAX_SLOTS}, not {raw!r}")
    return int(raw)


def socket_path(directory: str, slot: int) -> str:
    """The Unix socket of a slot (nginx/entrypoint.sh lists the same names)."""
    return os.path.join(directory, f"stream-{slot}.sock")


def claim(directory: str, slots: int) -> int:
    """Lock the first free slot of `directory` for this process's life; its number."""
    held = os.environ.get(SLOT_ENV)
    if held:
        return int(held)
    if not os.path.isdir(directory):
        raise SlotError(f"STREAM_SOCKET_DIR {directory!r} is not a directory (the volume shared with nginx)")
    for slot in range(1, slots + 1):
        fd = os.open(os.path.join(directory, f"stream-{slot}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # The descriptor stays open (and the lock held) until the process exits.
        os.environ[SLOT_ENV] = str(slot)
        return slot
    raise SlotError(
        f"all {slots} stream slots in {directory} are taken: nginx reaches at most "
        "STREAM_SLOTS replicas per host; raise STREAM_SLOTS (for nginx and the stream service) "
        "or run fewer replicas"
    )


def current() -> int | None:
    """The slot this process (or its gunicorn master) claimed, if any."""
    held = os.environ.get(SLOT_ENV)
    return int(held) if held else None
