"""The sweep: channels whose streams all lapsed (their workers died without
saying so) become vacating, and vacated events that came due are written
(occupancy.SWEEP). The dispatcher holding a partition's lane 0 sweeps it.
"""

from __future__ import annotations

import time

from .contract import presence_key
from .leases import Client
from .occupancy import SWEEP, header_keys, occupied_key, vacating_key

MOST = 100  # channels looked at per sweep call
SLACK_MS = 1000  # candidates this far ahead of the local clock too: Redis's clock decides


def sweep(client: Client, partition: int, delay_seconds: float) -> tuple[int, int]:
    """One sweep call; returns (candidates looked at, vacated events written)."""
    horizon = time.time() * 1000 + SLACK_MS
    # Both reads in one round trip (one slot: a pipeline works on a cluster too).
    pipe = client.pipeline(transaction=False)
    pipe.zrange(occupied_key(partition), 0, MOST - 1, withscores=True)
    pipe.zrange(vacating_key(partition), 0, MOST - 1, withscores=True)
    lowest_occupied, lowest_vacating = pipe.execute()
    occupied = _due(lowest_occupied, horizon)
    vacating = _due(lowest_vacating, horizon)
    if not occupied and not vacating:
        return 0, 0
    keys = [*header_keys(partition), *(presence_key(c, partition) for c in occupied)]
    args: list[object] = [int(delay_seconds * 1000), len(occupied), *occupied, *vacating]
    written = int(SWEEP.run(client, keys, args))
    return len(occupied) + len(vacating), written


def _due(members: list[tuple[bytes, float]], horizon: float) -> list[str]:
    return [m.decode() for m, score in members if score < horizon]
