"""`python -m dispatcher`: run the webhook dispatcher, or work on its dead letters.

    python -m dispatcher                      # run (the Compose service's command)
    python -m dispatcher dead-letters [--limit N]
    python -m dispatcher replay --all | REF [REF ...]

Settings come from the environment (.env.example); in Compose, run the last two
with `docker compose exec webhook-dispatcher python -m dispatcher ...`.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (after gevent's patching, as every import that may use sockets)
import json  # noqa: E402
import logging.config  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from publisher.config import ConfigError  # noqa: E402
from publisher.logs import log_config  # noqa: E402

from . import deadletters  # noqa: E402
from .config import Config  # noqa: E402
from .service import Dispatcher, make_client  # noqa: E402

REPLAY_BATCH = 100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatcher", description="Herald's webhook dispatcher")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="send webhooks (the default)")
    listing = commands.add_parser("dead-letters", help="list dead letters as JSON lines, oldest first")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many per partition")
    replay = commands.add_parser("replay", help="put dead letters back in their lanes")
    replay.add_argument("refs", nargs="*", help="dead letters to replay, as listed (partition/entry)")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    args = parser.parse_args(argv)

    logging.config.dictConfig(log_config(os.environ.get("LOG_LEVEL", "info") or "info"))
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 2
    if args.command in (None, "run"):
        return run(config)
    if not config.enabled:
        print("dispatcher: webhooks are off (no WEBHOOK_URL)", file=sys.stderr)
        return 2
    client = make_client(config)
    if args.command == "dead-letters":
        for letter in deadletters.listing(client, config.partitions, max(1, args.limit)):
            print(json.dumps(letter.as_json(), ensure_ascii=False))
        return 0
    return replay_refs(client, config, args.refs, args.all, parser)


def run(config: Config) -> int:
    dispatcher = Dispatcher(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, dispatcher.stopping.set)
    dispatcher.serve()
    return 0


def replay_refs(
    client: object, config: Config, refs: list[str], every: bool, parser: argparse.ArgumentParser
) -> int:
    if every == bool(refs):
        parser.error("replay takes either --all or the refs of dead letters (partition/entry)")
    wanted: dict[int, list[str]] = {}
    if every:
        for letter in deadletters.listing(client, config.partitions, 1_000_000):  # type: ignore[arg-type]
            wanted.setdefault(letter.partition, []).append(letter.entry)
    for ref in refs:
        number, _, entry = ref.partition("/")
        if not number.isascii() or not number.isdigit() or not entry:
            parser.error(f"not a dead letter's ref (partition/entry): {ref!r}")
        if int(number) >= config.partitions:
            parser.error(f"no partition {number} (PARTITIONS={config.partitions})")
        wanted.setdefault(int(number), []).append(entry)
    total = 0
    for partition, entries in wanted.items():
        for i in range(0, len(entries), REPLAY_BATCH):
            total += deadletters.replay(client, partition, entries[i : i + REPLAY_BATCH])  # type: ignore[arg-type]
    print(json.dumps({"replayed": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
