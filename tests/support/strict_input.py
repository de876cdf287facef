"""Hostile request parameters for both services, as hypothesis strategies, and
the one rule every answer must follow: never a 5xx, and every 4xx a JSON error.

Used against the real gunicorn services (tests/integration/test_bad_input.py)
and, with a smaller sample, through the Compose nginx (tests/e2e).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from hypothesis import strategies as st

# Numbers as a client might mangle them: digits of other scripts, superscripts,
# full-width, signs, fractions, huge and empty values.
NASTY_NUMBERS = [
    "²",
    "٣",
    "\uff11\uff12",
    "1²",
    "-1",
    "+1",
    "1.0",
    "1e3",
    "0x10",
    "0",
    "",
    " ",
    "9" * 40,
    "9" * 1000,
    "NaN",
    "inf",
    "\x00",
    "1\x00",
]
NASTY_IDS = [
    "000000000000-0",
    "000000000000-²",
    "٣٣٣٣٣٣٣٣٣٣٣٣-1",
    "abcdef012345-" + "9" * 19,
    "abcdef012345-" + "9" * 500,
    "0.abcdef012345-1_0.abcdef012345-2",
    "_".join(f"{i}.abcdef012345-1" for i in range(70)),
    "\uff19.abcdef012345-1",
    "-",
    "abcdef012345--1",
]

# Text for any parameter: any Unicode scalar (no lone surrogates: they cannot
# travel in UTF-8), often digits of every script.
unicode_digits = st.characters(categories=["Nd", "No", "Nl"])
any_text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.text(unicode_digits, min_size=1, max_size=6),
    st.sampled_from(NASTY_NUMBERS + NASTY_IDS),
)
# Raw bytes, sent percent-encoded (so invalid UTF-8 and NUL reach the app).
odd_bytes = st.binary(max_size=30)
values = st.one_of(any_text, odd_bytes, st.integers(min_value=0, max_value=10**30).map(str))
channel_values = st.one_of(st.sampled_from(["orders", "a.b:c-d_e", "private-x", "x" * 128]), values)


def repeated(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """No value, one, or a repeated parameter (duplicates)."""
    return st.lists(strategy, max_size=3)


def single(good: st.SearchStrategy[Any], nasty: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """The values of a one-value parameter: none, a good one, a nasty one (so the
    rest of the request is often valid, and the nasty value is what gets parsed),
    or a repeat."""
    return st.one_of(
        st.just([]),
        good.map(lambda v: [v]),
        nasty.map(lambda v: [v]),
        st.lists(st.one_of(good, nasty), min_size=2, max_size=3),
    )


good_channels = st.lists(
    st.sampled_from(["orders", "a.b:c-d_e", "private-x", "x" * 128]), min_size=1, max_size=3
)
channel_lists = st.one_of(good_channels, repeated(channel_values))
good_numbers = st.integers(min_value=0, max_value=2000).map(str)
nasty_numbers = st.one_of(
    st.sampled_from(NASTY_NUMBERS),
    st.text(unicode_digits, min_size=1, max_size=4),
    st.tuples(good_numbers, st.text(unicode_digits, min_size=1, max_size=2)).map("".join),
    values,
)
hex12 = st.from_regex(r"[0-9a-f]{12}", fullmatch=True)
good_ids = st.one_of(
    st.tuples(hex12, good_numbers).map("-".join),
    st.lists(
        st.tuples(st.integers(0, 3).map(str), hex12, good_numbers).map(lambda t: f"{t[0]}.{t[1]}-{t[2]}"),
        min_size=1,
        max_size=3,
    ).map("_".join),
)
nasty_ids = st.one_of(
    st.sampled_from(NASTY_IDS),
    st.tuples(hex12, st.text(unicode_digits, min_size=1, max_size=4)).map("-".join),
    st.tuples(st.text(unicode_digits, min_size=1, max_size=2), hex12, good_numbers).map(
        lambda t: f"{t[0]}.{t[1]}-{t[2]}"
    ),
    values,
)


def encode(value: str | bytes) -> str:
    return quote(value, safe="")


def query(params: list[tuple[str, str | bytes]]) -> str:
    """A query string; names are written as given (`tok%65n` stays percent-encoded)."""
    return "&".join(f"{name}={encode(value)}" for name, value in params)


# A header value requests (and HTTP) can carry: no CR, LF or other control
# bytes, no leading whitespace; Latin-1 and UTF-8 bytes are fine.
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60),
    st.text(unicode_digits, min_size=1, max_size=6).map(str.encode),
    st.sampled_from(NASTY_IDS),
    st.binary(max_size=30).map(lambda b: bytes(c for c in b if c >= 0x21 and c != 0x7F)),
).map(lambda v: v if isinstance(v, bytes) else v.strip())

authorizations = st.one_of(
    header_values,
    header_values.map(lambda v: b"Bearer " + (v if isinstance(v, bytes) else v.encode())),
    st.sampled_from(["Bearer", "Bearer ", "bearer x.y.z", "Basic Zm9vOmJhcg==", "Bearer a.b.c"]),
)

NO_TOKENS: st.SearchStrategy[str] = st.nothing()

# Names as they may arrive: exact, percent-encoded (%74oken), another case.
param_names = {
    "token": st.sampled_from(["token", "Token", "tok%65n"]),
}


def header_bytes(value: str | bytes) -> bytes:
    """A header value as it can travel: UTF-8 bytes (http.client would refuse
    non-Latin-1 text), without control bytes, nor leading white space."""
    raw = value.encode() if isinstance(value, str) else value
    return bytes(c for c in raw if c >= 0x20 and c != 0x7F).lstrip(b" ")


@dataclass
class Call:
    """One generated request."""

    method: str
    path: str
    headers: dict[str, str | bytes] = field(default_factory=dict)
    body: bytes | None = None

    def send(self, base: str, timeout: float = 10) -> requests.Response:
        # stream=True: a valid /stream request opens a stream; only its head is read.
        answer = requests.request(
            self.method,
            base + self.path,
            headers={"Connection": "close", **{k: header_bytes(v) for k, v in self.headers.items()}},
            data=self.body,
            timeout=timeout,
            stream=True,
        )
        if not answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            answer.content  # noqa: B018 (read the whole answer)
        answer.close()
        return answer


@st.composite
def stream_calls(draw: st.DrawFn, tokens: st.SearchStrategy[str] = NO_TOKENS) -> Call:
    """GET (sometimes HEAD or OPTIONS) /stream with any parameters and headers;
    `tokens`: subscribe tokens to mix in (signed ones, with odd claims)."""
    params: list[tuple[str, str | bytes]] = []
    params += [("channel", v) for v in draw(channel_lists)]
    params += [("lastEventId", v) for v in draw(single(good_ids, nasty_ids))]
    params += [(draw(param_names["token"]), v) for v in draw(single(tokens, values))]
    headers: dict[str, str | bytes] = {}
    if draw(st.booleans()):
        headers["Last-Event-ID"] = draw(st.one_of(header_values, good_ids, nasty_ids))
    if draw(st.booleans()):
        headers["Authorization"] = draw(st.one_of(authorizations, tokens.map(lambda t: f"Bearer {t}")))
    if draw(st.booleans()):
        headers["Origin"] = draw(st.sampled_from(["https://app.example", "https://evil.example", "null"]))
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "OPTIONS"]))
    if method == "OPTIONS" and draw(st.booleans()):
        headers["Access-Control-Request-Method"] = "GET"
    return Call(method, f"/stream?{query(draw(st.permutations(params)))}", headers)


@st.composite
def history_calls(draw: st.DrawFn, tokens: st.SearchStrategy[str] = NO_TOKENS) -> Call:
    """GET /history with any channel, after, limit, token."""
    params: list[tuple[str, str | bytes]] = []
    params += [("channel", v) for v in draw(channel_lists)]
    params += [("after", v) for v in draw(single(good_ids, nasty_ids))]
    params += [("limit", v) for v in draw(single(good_numbers, nasty_numbers))]
    params += [(draw(param_names["token"]), v) for v in draw(single(tokens, values))]
    headers: dict[str, str | bytes] = {}
    if draw(st.booleans()):
        headers["Authorization"] = draw(st.one_of(authorizations, tokens.map(lambda t: f"Bearer {t}")))
    if draw(st.booleans()):
        headers["Origin"] = draw(st.sampled_from(["https://app.example", "https://evil.example"]))
    method = draw(st.sampled_from(["GET", "GET", "GET", "OPTIONS"]))
    return Call(method, f"/history?{query(draw(st.permutations(params)))}", headers)


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=utf-8",
    "text/plain",
    "multipart/form-data",
    "multipart/form-data; boundary=x",
    "application/json\u00b2",
    "",
]


@st.composite
def publish_calls(draw: st.DrawFn, channels: list[str]) -> Call:
    """POST /publish: a form with any fields (repeated too), or JSON with odd
    fields; any Content-Type and Idempotency-Key."""
    headers: dict[str, str | bytes] = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type:
        headers["Content-Type"] = content_type.encode()
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(header_values)
    if draw(st.booleans()):
        fields: list[tuple[str, str | bytes]] = []
        fields += [("channel", v) for v in draw(repeated(st.one_of(st.sampled_from(channels), values)))]
        fields += [("event", v) for v in draw(repeated(values))]
        fields += [("data", v) for v in draw(repeated(values))]
        fields += [(draw(st.sampled_from(["extra", "Data", "d%61ta"])), v) for v in draw(repeated(values))]
        body = query(draw(st.permutations(fields))).encode()
    else:
        event: dict[str, Any] = {"channel": draw(st.one_of(st.sampled_from(channels), st.text(max_size=20)))}
        event["data"] = draw(st.one_of(st.integers(min_value=-(10**40), max_value=10**40), any_text))
        if draw(st.booleans()):
            event["event"] = draw(any_text)
        if draw(st.booleans()):
            event[draw(st.text(max_size=8))] = draw(st.integers())
        text = json.dumps(event if draw(st.booleans()) else [event, event], ensure_ascii=draw(st.booleans()))
        # A repeated key, the way a hand-written body might carry one.
        if draw(st.booleans()):
            text = text.replace('{"channel"', '{"data": 1, "channel"', 1)
        body = text.encode()
    return Call("POST", "/publish", headers, body)


@st.composite
def channel_calls(draw: st.DrawFn) -> Call:
    """GET /channels/<anything> (presence), with or without a token."""
    name = draw(st.one_of(channel_values, st.sampled_from(["", ".", "..", "%2F", "a/b"])))
    headers: dict[str, str | bytes] = {}
    if draw(st.booleans()):
        headers["Authorization"] = draw(authorizations)
    return Call(
        draw(st.sampled_from(["GET", "GET", "HEAD", "OPTIONS"])), "/channels/" + encode(name), headers
    )


def check_answer(call: Call, answer: requests.Response) -> None:
    """Never a 5xx; a 4xx is a JSON error `{"error": code, "message": text}`."""
    what = f"{call.method} {call.path} {call.headers!r} {call.body!r}"
    assert answer.status_code < 500, f"{answer.status_code} for {what}: {answer.text[:300]}"
    if answer.status_code >= 400 and call.method != "HEAD":
        assert answer.headers.get("Content-Type", "").startswith("application/json"), what
        body = answer.json()
        assert isinstance(body, dict) and set(body) == {"error", "message"}, what
        assert isinstance(body["error"], str) and body["message"], what
