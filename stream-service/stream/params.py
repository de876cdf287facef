"""Request parameters of /stream and /history, parsed strictly.

- Numbers are ASCII digits only, and bounded: `'²'.isdigit()` is true in
  Python, and `int()` reads `'٣'` and full-width digits, so neither is used to
  validate input; a regex of `[0-9]` is.
- A parameter that takes one value (`lastEventId`, `after`, `limit`, `token`)
  must come at most once. A repeat is refused (400 `duplicate_parameter`)
  rather than resolved: whichever copy the service read, a proxy, a WAF or a
  log redaction in front of it may have read the other one. (`channel` is the
  one repeatable parameter; repeats of a channel are merged.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from werkzeug.datastructures import MultiDict

from .ids import BadEventId, ResumeId, parse_event_id

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DIGITS_RE = re.compile(r"[0-9]{1,9}")
BLANK = " \t"


class BadRequest(Exception):
    """A stream request refused before the stream starts."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def refuse_repeats(args: MultiDict[str, str], names: Iterable[str]) -> None:
    """400 `duplicate_parameter` if any of `names` comes more than once."""
    for name in names:
        if len(args.getlist(name)) > 1:
            raise BadRequest("duplicate_parameter", f"give the `{name}` parameter at most once")


def whole_number(raw: str | None, name: str, *, least: int, most: int, default: int) -> int:
    """A whole number of ASCII digits from `least` to `most`; `default` when absent or blank."""
    if raw is None or not raw.strip(BLANK):
        return default
    text = raw.strip(BLANK)
    if not DIGITS_RE.fullmatch(text) or not least <= int(text) <= most:
        raise BadRequest(f"invalid_{name}", f"{name} must be a whole number from {least} to {most}")
    return int(text)


def parse_channels(values: list[str], limit: int) -> list[str]:
    """The requested channels, validated and de-duplicated in order."""
    if not values:
        raise BadRequest("missing_channel", "give at least one channel: /stream?channel=<name>")
    channels = list(dict.fromkeys(values))
    if len(channels) > limit:
        raise BadRequest("too_many_channels", f"at most {limit} channels per stream, got {len(channels)}")
    for channel in channels:
        if not CHANNEL_RE.fullmatch(channel):
            raise BadRequest("invalid_channel", "a channel is 1-128 characters of A-Z a-z 0-9 _ . : -")
    return channels


def parse_last_event_id(header: str | None, query: str | None) -> ResumeId | None:
    """The resume point: the Last-Event-ID header (reconnects), else ?lastEventId=."""
    raw = header
    if raw is None or not raw.strip():
        raw = query
    if raw is None or not raw.strip():
        return None
    try:
        return parse_event_id(raw)
    except BadEventId as exc:
        raise BadRequest("invalid_last_event_id", str(exc)) from None


MAX_HISTORY_LIMIT = 1000


def parse_after(raw: str | None) -> ResumeId | None:
    """`after=`: an id as /stream sends them (plain or vector), or nothing."""
    if raw is None or not raw.strip():
        return None
    try:
        return parse_event_id(raw)
    except BadEventId as exc:
        raise BadRequest("invalid_after", str(exc).replace("last event id", "`after` id")) from None


def parse_limit(raw: str | None, most: int) -> int:
    """`limit=`: how many events, 1 to `most` (default 100); ASCII digits only."""
    return whole_number(raw, "limit", least=1, most=most, default=min(100, most))
