"""Redis memory per event and per channel, through the publisher's own script.

    PYTHONPATH=publisher-service .venv/bin/python -m tests.load.redis_memory redis://127.0.0.1:6390/0

Runs against a scratch Redis, which it FLUSHALLs (refuses a Redis that holds
keys unless --force): publishes events of a few typical sizes with the real
publish script (HISTORY_MAXLEN=1000, HISTORY_TTL_SECONDS=604800, so each
channel is also in the expiries set) and reports the growth of `INFO memory`
`used_memory` per event, and `MEMORY USAGE` of one full stream. The figures
behind REDIS_MAXMEMORY's default are in docs/capacity.md ("Redis memory").
"""

from __future__ import annotations

import argparse
import hashlib

import redis
from publisher.routing import Standalone
from publisher.store import EventStore, Idempotency
from publisher.validation import Event, encode_data


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def measure(
    url: str, size: int, channels: int, per_channel: int, *, idempotent: bool = False, batch: int = 50
) -> tuple[float, int, int]:
    """(bytes per event, events, MEMORY USAGE of the first channel's stream)."""
    client = redis.Redis.from_url(url)
    client.flushall()
    store = EventStore(Standalone(redis.Redis.from_url(url)), 1000, 604800)
    store.publish([Event("warm-up", "message", "1")])
    before = used(client)
    data = encode_data({"text": "x" * max(0, size - 11)}, 1 << 20)  # `size` bytes of JSON
    events = 0
    for c in range(channels):
        name = f"room.{c:06d}"
        for start in range(0, per_channel, batch):
            n = min(batch, per_channel - start)
            once = None
            if idempotent:
                key = f"{events:012d}"
                once = Idempotency(f"{'0' * 16}:{key}", hashlib.sha256(key.encode()).hexdigest(), 86400)
            store.publish([Event(name, "message", data)] * n, once)
            events += n
    grown = used(client) - before
    stream: int = client.memory_usage("herald:{p0}:stream:room.000000", samples=0) or 0
    client.close()
    return grown / events, events, stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url")
    parser.add_argument("--force", action="store_true", help="flush a Redis that holds keys")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.url)
    if client.dbsize() and not args.force:
        raise SystemExit(f"{args.url} holds keys: this FLUSHALLs it; use a scratch Redis or --force")
    print("Redis", client.info("server")["redis_version"])
    client.close()
    cases = [
        ("100 B events, 20 channels x 1000", 100, 20, 1000, False, 50),
        ("1 KB events, 20 channels x 1000", 1000, 20, 1000, False, 50),
        ("4 KB events, 10 channels x 1000", 4096, 10, 1000, False, 50),
        ("100 B events, one per channel, 20,000 channels", 100, 20000, 1, False, 50),
        ("100 B events, one per request with an Idempotency-Key", 100, 5, 2000, True, 1),
    ]
    for label, size, channels, per_channel, idempotent, batch in cases:
        per_event, events, stream = measure(
            args.url, size, channels, per_channel, idempotent=idempotent, batch=batch
        )
        print(f"{label}: {per_event:,.0f} B per event ({events:,} events); one stream: {stream:,} B")


if __name__ == "__main__":
    main()
