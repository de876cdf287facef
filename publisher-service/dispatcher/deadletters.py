"""Dead letters: events an endpoint did not take within WEBHOOK_RETRY_SECONDS,
kept per partition for an operator to read and replay (docs/webhooks.md).

`python -m dispatcher dead-letters` lists them; `python -m dispatcher replay`
puts them back in their lanes, for the endpoint that failed them only, with
their original ids (receivers deduplicate on webhook-id as for any redelivery).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from .contract import DEAD_MAXLEN, Script, dead_key
from .events import Event
from .occupancy import LANE_MAXLEN, LANES, lane_key

# KEYS[1] = dead letters, KEYS[2] = the lane. ARGV[1] = consumer group,
# ARGV[2] = lane number, ARGV[3] = the last failure, ARGV[4] = attempts, then
# per event: its entry, id, type, channel, time. Each is copied to the dead
# letters and acknowledged in the lane in one step: never both lost and gone.
BURY = Script(f"""#!lua
local now = redis.call('TIME')
local ms = now[1] * 1000 + math.floor(now[2] / 1000)
for i = 5, #ARGV, 5 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', {DEAD_MAXLEN}, '*',
    'id', ARGV[i + 1], 'type', ARGV[i + 2], 'channel', ARGV[i + 3], 'time', ARGV[i + 4],
    'endpoint', ARGV[1], 'lane', ARGV[2], 'reason', ARGV[3], 'attempts', ARGV[4], 'failed', ms)
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[i])
end
return (#ARGV - 4) / 5
""")

# KEYS[1] = dead letters, KEYS[2..] = the partition's lanes. ARGV = dead letter
# entry ids. Each one found goes back to its lane, for its endpoint only, and
# leaves the dead letters, in one step. Returns how many were put back.
REPLAY = Script(f"""#!lua
local replayed = 0
for _, id in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found == 1 then
    local f = {{}}
    local fields = found[1][2]
    for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
    local lane = tonumber(f['lane'])
    if lane and lane >= 0 and lane < {LANES} then
      redis.call('XADD', KEYS[2 + lane], 'MAXLEN', '~', {LANE_MAXLEN}, '*', 'type', f['type'],
        'channel', f['channel'], 'time', f['time'], 'id', f['id'], 'endpoint', f['endpoint'])
      redis.call('XDEL', KEYS[1], id)
      replayed = replayed + 1
    end
  end
end
return replayed
""")


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, as listed."""

    partition: int
    entry: str
    fields: dict[str, str]

    @property
    def ref(self) -> str:
        """How `replay` names it: partition/entry."""
        return f"{self.partition}/{self.entry}"

    def as_json(self) -> dict[str, object]:
        return {"ref": self.ref, **self.fields}


def bury(
    client: redis.Redis | RedisCluster,
    partition: int,
    lane: int,
    group: str,
    events: list[Event],
    reason: str,
    attempts: int,
) -> None:
    """Move `events` to the dead letters and acknowledge them in their lane."""
    args: list[object] = [group, lane, reason, attempts]
    for e in events:
        args += [e.entry, e.id, e.type, e.channel, e.time_ms]
    BURY.run(client, [dead_key(partition), lane_key(partition, lane)], args)


def listing(client: redis.Redis | RedisCluster, partitions: int, most: int) -> Iterator[DeadLetter]:
    """Up to `most` dead letters per partition, oldest first."""
    for p in range(partitions):
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(dead_key(p), count=most) or []  # type: ignore[assignment]
        for entry, fields in entries:
            yield DeadLetter(p, _text(entry), {_text(k): _text(v) for k, v in fields.items()})


def replay(client: redis.Redis | RedisCluster, partition: int, entries: list[str]) -> int:
    """Put the named dead letters of `partition` back in their lanes; how many were."""
    if not entries:
        return 0
    lanes = [lane_key(partition, lane) for lane in range(LANES)]
    return int(REPLAY.run(client, [dead_key(partition), *lanes], entries))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
