"""The stream service's strict input rules (issue 16, items 6-8): ASCII numbers,
repeated parameters, subscribe tokens, the secret's length, CORS preflights,
and U+2028/U+2029/U+0085 escaped in event data."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from stream import sse
from stream.app import create_app
from stream.auth import AccessDenied, authorize, covers
from stream.config import Config, ConfigError
from stream.frames import event_body
from stream.params import MAX_HISTORY_LIMIT, BadRequest, parse_limit, refuse_repeats, whole_number
from werkzeug.datastructures import MultiDict

SECRET = "unit-test-subscribe-secret-0123456789abcdef"
CHANNEL = "private-user-1"


def token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def check(channels: list[str], tok: str | None, **kw: str) -> Any:
    return authorize(channels, tok, prefix="private-", secret=SECRET, **kw)


def later() -> int:
    return int(time.time()) + 60


# -- numbers and repeated parameters -------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["²", "٣", "\uff11\uff12", "1²", "-1", "+1", "1.0", "1e3", "0x10", "0", "1001", "9" * 40]
)
def test_limit_is_ascii_digits_in_range(raw: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parse_limit(raw, MAX_HISTORY_LIMIT)
    assert refused.value.code == "invalid_limit"


@pytest.mark.parametrize(
    ("raw", "value"), [(None, 100), ("", 100), (" ", 100), ("1", 1), (" 7 ", 7), ("1000", 1000)]
)
def test_limit_accepted(raw: str | None, value: int) -> None:
    assert parse_limit(raw, MAX_HISTORY_LIMIT) == value


@given(st.text(max_size=12))
def test_a_number_is_either_ascii_digits_in_range_or_refused(raw: str) -> None:
    try:
        value = whole_number(raw, "n", least=1, most=50, default=3)
    except BadRequest:
        assert not raw.strip(" \t").isascii() or not raw.strip(" \t").isdigit() or not 1 <= int(raw) <= 50
        return
    assert 1 <= value <= 50


def test_a_single_valued_parameter_may_not_repeat() -> None:
    refuse_repeats(MultiDict([("channel", "a"), ("channel", "b"), ("token", "t")]), ("token", "limit"))
    for name in ("token", "limit"):
        with pytest.raises(BadRequest) as refused:
            refuse_repeats(MultiDict([(name, "1"), (name, "2")]), ("token", "limit"))
        assert refused.value.code == "duplicate_parameter"


# -- subscribe tokens -----------------------------------------------------------------


def test_a_good_token_grants_until_its_exp() -> None:
    exp = later()
    assert check([CHANNEL], token({"channels": [CHANNEL], "exp": exp})).expires == exp


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"channels": [CHANNEL]}, "invalid_token"),  # no exp
        ({"channels": [CHANNEL], "exp": "9999999999"}, "invalid_token"),  # a string exp
        ({"channels": [CHANNEL], "exp": None}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": [9999999999]}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": 9999999999, "nbf": "0"}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": 9999999999, "iat": "0"}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": 9999999999, "nbf": True}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": 1}, "token_expired"),
        ({"channels": [CHANNEL], "exp": 9999999999, "nbf": 9999999998}, "invalid_token"),
        ({"channels": CHANNEL, "exp": 9999999999}, "invalid_token"),
        ({"channels": [CHANNEL], "exp": 9999999999, "aud": "someone"}, "invalid_token"),
    ],
)
def test_time_claims_are_numbers_and_exp_is_required(claims: dict[str, Any], code: str) -> None:
    with pytest.raises(AccessDenied) as refused:
        check([CHANNEL], token(claims))
    assert (refused.value.status, refused.value.code) == (401, code)


def test_a_boolean_exp_is_refused() -> None:
    # True == 1 to PyJWT (so it says expired); either way the stream never opens.
    with pytest.raises(AccessDenied) as refused:
        check([CHANNEL], token({"channels": [CHANNEL], "exp": True}))
    assert refused.value.status == 401


def test_audience_and_issuer_are_checked_when_configured() -> None:
    good = {"channels": [CHANNEL], "exp": later(), "aud": "herald", "iss": "app"}
    assert check([CHANNEL], token(good), audience="herald", issuer="app").expires == good["exp"]
    for claims in (
        {**good, "aud": "other"},
        {**good, "iss": "other"},
        {k: v for k, v in good.items() if k != "aud"},
        {k: v for k, v in good.items() if k != "iss"},
    ):
        with pytest.raises(AccessDenied) as refused:
            check([CHANNEL], token(claims), audience="herald", issuer="app")
        assert refused.value.code == "invalid_token", claims
    # Only the audience configured: the issuer is not looked at.
    assert check([CHANNEL], token({**good, "iss": "any"}), audience="herald").expires == good["exp"]


@pytest.mark.parametrize(
    ("entry", "channel", "covered"),
    [
        ("private-user-1", "private-user-1", True),
        ("private-user-1", "private-user-10", False),
        ("private-user-1*", "private-user-10", True),  # a trailing * is a prefix, as written
        ("private-user-1*", "private-user-1", True),
        ("private-user-?", "private-user-1", False),  # ? is a plain character
        ("private-user-[0-9]", "private-user-1", False),  # so is [
        ("private-*-1", "private-user-1", False),  # a * elsewhere is too
        ("private-team-*", "private-team-a", True),
        ("private-team-*", "private-teams", False),
        ("*", "private-anything", True),
    ],
)
def test_only_a_trailing_star_is_a_wildcard(entry: str, channel: str, covered: bool) -> None:
    assert covers(entry, channel) is covered
    tok = token({"channels": [entry], "exp": later()})
    if covered:
        check([channel], tok)
    else:
        with pytest.raises(AccessDenied) as refused:
            check([channel], tok)
        assert refused.value.code == "forbidden_channel"


@pytest.mark.parametrize("secret", ["abc", "x" * 31, "é" * 15])
def test_a_short_subscribe_secret_is_refused_at_start(secret: str) -> None:
    with pytest.raises(ConfigError, match="SUBSCRIBE_SECRET must be at least 32 bytes"):
        Config.from_env({"SUBSCRIBE_SECRET": secret})


def test_a_long_enough_secret_and_no_secret_are_fine() -> None:
    assert Config.from_env({"SUBSCRIBE_SECRET": "x" * 32}).subscribe_secret == "x" * 32
    assert Config.from_env({"SUBSCRIBE_SECRET": "é" * 16}).subscribe_secret == "é" * 16  # 32 bytes
    assert Config.from_env({}).subscribe_secret == ""
    config = Config.from_env({"SUBSCRIBE_AUDIENCE": " herald ", "SUBSCRIBE_ISSUER": "app"})
    assert (config.subscribe_audience, config.subscribe_issuer) == ("herald", "app")


# -- CORS preflights (the app without Redis: preflights never touch it) ----------------


@pytest.fixture(scope="module")
def client() -> Any:
    app = create_app(Config(cors_origins=("https://app.example",)))
    return app.test_client()


@pytest.mark.parametrize("path", ["/stream", "/history"])
def test_a_preflight_from_an_allowed_origin(client: Any, path: str) -> None:
    answer = client.options(
        path + "?channel=a",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization,last-event-id",
        },
    )
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"
    assert answer.headers["Access-Control-Allow-Headers"] == "Authorization, Last-Event-ID"
    assert "GET" in answer.headers["Access-Control-Allow-Methods"]
    assert int(answer.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in answer.headers["Vary"]


@pytest.mark.parametrize("path", ["/stream", "/history"])
def test_a_preflight_from_another_origin_is_a_json_403(client: Any, path: str) -> None:
    answer = client.options(
        path, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert answer.status_code == 403
    assert answer.json["error"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_options_without_an_origin_and_other_methods(client: Any) -> None:
    plain = client.options("/stream")
    assert plain.status_code == 204
    assert set(plain.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = client.open("/stream", method=method, headers={"Origin": "https://app.example"})
        assert answer.status_code == 405
        assert answer.json["error"] == "method_not_allowed"
        assert set(answer.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}
        # Every answer of /stream carries CORS for an allowed origin, errors included.
        assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_errors_are_readable_cross_origin_with_retry_after_exposed(client: Any) -> None:
    answer = client.get("/history?channel=a&limit=%C2%B2", headers={"Origin": "https://app.example"})
    assert answer.status_code == 400 and answer.json["error"] == "invalid_limit"
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Retry-After" in answer.headers["Access-Control-Expose-Headers"]
    other = client.get("/history?channel=a&limit=%C2%B2", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    repeated = client.get("/stream?channel=a&token=x&token=y")
    assert repeated.status_code == 400 and repeated.json["error"] == "duplicate_parameter"


# -- U+2028, U+2029, U+0085 in data ---------------------------------------------------


SEPARATORS = ["\u2028", "\u2029", "\u0085"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_line_separators_in_data_are_escaped(sep: str) -> None:
    value = {"a": f"x{sep}event: forged{sep}id: 9"}
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert sep.encode() in raw
    body = event_body(b"message", raw)
    assert sep.encode() not in body
    data = body.decode().split("data: ", 1)[1].rstrip("\n")
    assert json.loads(data) == value
    assert body.decode().splitlines() == body.decode().split("\n")[:-1]  # nothing splits but LF


def test_data_without_separators_is_passed_through_unchanged() -> None:
    raw = json.dumps({"q": "“quoted” … ü"}, ensure_ascii=False).encode()
    assert sse.json_data(raw) is raw or sse.json_data(raw) == raw
    plain = b'{"n":1}'
    assert sse.json_data(plain) is plain


@given(st.recursive(st.text() | st.integers(), lambda inner: st.lists(inner, max_size=3), max_leaves=6))
def test_escaping_keeps_the_value(value: Any) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    escaped = sse.json_data(raw)
    assert json.loads(escaped) == value
    assert not any(sep.encode() in escaped for sep in SEPARATORS)
