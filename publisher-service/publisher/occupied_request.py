"""What `GET /channels?occupied=true` asks for: how many channels, and from
where (a cursor from a previous answer), parsed strictly; and the cursor's form.

- The parameters are `occupied` (required, exactly `true`), `limit` and
  `cursor`. Any other is refused (400 `unknown_parameter`), and so is any of
  them given twice (400 `duplicate_parameter`): whichever copy the publisher
  read, a proxy or a log in front of it may have read the other.
- `limit` is 1-4 ASCII digits, 1 to MAX_LIMIT (DEFAULT_LIMIT when absent);
  `'²'.isdigit()` is true in Python and `int()` reads `'٣'`, so a regex of
  `[0-9]` validates it. A blank value is refused, not taken as the default.
- A cursor is base64url (no padding) of the compact JSON `[partition, last
  channel]`: where the previous page stopped. `""` as the channel means the
  start of that partition. It is opaque to clients, and only the exact text
  this module makes is accepted (400 `bad_cursor` otherwise): a partition
  within PARTITIONS, a valid channel name of that very partition.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

from werkzeug.datastructures import MultiDict

from .contract import partition_of
from .validation import CHANNEL_RE, InvalidRequest

PARAMETERS = ("occupied", "limit", "cursor")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
LIMIT_RE = re.compile(r"[0-9]{1,4}")
# The longest cursor this module makes is well under 256 characters
# (`[1023,"<128 characters>"]` is 140 bytes); more is refused before decoding.
CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")

# Where a page starts: (partition, the channel after which it starts; "" for
# the partition's first).
Start = tuple[int, str]


@dataclass(frozen=True)
class OccupiedQuery:
    """A valid request: at most `limit` channels, from `start` (None: the first)."""

    limit: int
    start: Start | None


def _bad(code: str, message: str) -> InvalidRequest:
    return InvalidRequest(400, code, message)


def encode_cursor(partition: int, channel: str) -> str:
    """The cursor of a page that ends at `channel` of `partition`."""
    text = json.dumps([partition, channel], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def decode_cursor(raw: str, partitions: int) -> Start:
    """The (partition, channel) of a cursor made by `encode_cursor`; 400 `bad_cursor` otherwise."""
    bad = _bad(
        "bad_cursor",
        "cursor is not one this endpoint gave: pass the next_cursor of a previous answer as it is "
        "(a cursor holds for the same PARTITIONS only)",
    )
    if not CURSOR_RE.fullmatch(raw) or len(raw) % 4 == 1:
        raise bad
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8"))
    except (ValueError, RecursionError):  # binascii.Error, UnicodeDecodeError, JSONDecodeError
        raise bad from None
    if not (isinstance(doc, list) and len(doc) == 2):
        raise bad
    partition, channel = doc
    if type(partition) is not int or not isinstance(channel, str) or not 0 <= partition < partitions:
        raise bad
    if channel and not (CHANNEL_RE.fullmatch(channel) and partition_of(channel, partitions) == partition):
        raise bad
    # Exactly the text encode_cursor makes: no other spelling of the same cursor.
    if encode_cursor(partition, channel) != raw:
        raise bad
    return partition, channel


def parse_occupied_query(args: MultiDict[str, str], partitions: int) -> OccupiedQuery:
    """The query string of `GET /channels?occupied=true`, or a 400 saying what is wrong."""
    for name, values in args.lists():
        if name not in PARAMETERS:
            shown = name if len(name) <= 40 else name[:40] + "..."
            message = f"unknown parameter {shown!r}: the parameters are occupied, limit, cursor"
            raise _bad("unknown_parameter", message)
        if len(values) > 1:
            raise _bad("duplicate_parameter", f"give the `{name}` parameter at most once")
    if args.get("occupied") != "true":
        raise _bad("invalid_occupied", "occupied=true is required: the occupied channels are the ones listed")
    raw = args.get("limit")
    limit = DEFAULT_LIMIT
    if raw is not None:
        if not LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
            raise _bad("invalid_limit", f"limit must be a whole number from 1 to {MAX_LIMIT} (ASCII digits)")
        limit = int(raw)
    cursor = args.get("cursor")
    return OccupiedQuery(limit, None if cursor is None else decode_cursor(cursor, partitions))
