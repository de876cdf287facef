"""Who may call the publisher (publisher/guard.py, publisher/config.py), and data
text no SSE parser splits (publisher/validation.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from publisher.config import Config, ConfigError, is_loopback
from publisher.guard import Guard, same_origin, split_host
from publisher.validation import encode_data


def environ(host: str = "127.0.0.1:8080", **headers: str) -> dict[str, Any]:
    env: dict[str, Any] = {"wsgi.url_scheme": "http", "HTTP_HOST": host}
    for name, value in headers.items():
        env["HTTP_" + name.upper()] = value
    return env


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:8080", ("localhost", "8080")),
        ("127.0.0.1:80", ("127.0.0.1", "80")),
        ("[::1]:8080", ("[::1]", "8080")),
        ("[::1]", ("[::1]", None)),
        ("example.com:", ("example.com:", None)),
        ("example.com:\uff18\uff10", ("example.com:\uff18\uff10", None)),  # full-width digits: no port
    ],
)
def test_split_host(host: str, expected: tuple[str, str | None]) -> None:
    assert split_host(host) == expected


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.8.9.10", "::1", "[::1]"],
)
def test_loopback_names_and_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["", "0.0.0.0", "::", "[::]", "192.168.1.10", "10.0.0.1", "example.com", "localhost.example.com",
     "127.0.0.1.nip.io", "128.0.0.1", "::ffff:10.0.0.1", "evil-localhost"],
)  # fmt: skip
def test_other_names_and_addresses_are_not_loopback(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    ("origin", "scheme", "host", "same"),
    [
        ("http://127.0.0.1:8080", "http", "127.0.0.1:8080", True),
        ("http://LOCALHOST:8080", "http", "localhost:8080", True),
        ("http://127.0.0.1", "http", "127.0.0.1:80", True),  # default port either way
        ("https://herald.example", "https", "herald.example:443", True),
        ("https://herald.example", "https, http", "herald.example", True),  # first proxy's scheme
        # nginx passes Host without its port: any port of the same name and scheme.
        ("http://127.0.0.1:8080", "http", "127.0.0.1", True),
        ("http://127.0.0.1:3000", "http", "127.0.0.1:8080", False),
        ("https://127.0.0.1:8080", "http", "127.0.0.1:8080", False),
        ("http://localhost:8080", "http", "127.0.0.1:8080", False),
        ("http://evil.example", "http", "127.0.0.1", False),
        ("null", "http", "127.0.0.1", False),
        ("http://127.0.0.1/", "http", "127.0.0.1", False),
        ("", "http", "127.0.0.1", False),
        ("http://", "http", "", False),
    ],
)
def test_same_origin(origin: str, scheme: str, host: str, same: bool) -> None:
    assert same_origin(origin, scheme, host) is same


def test_requests_without_origin_or_fetch_metadata_are_not_browsers_and_pass() -> None:
    guard = Guard((), loopback_only=False)
    assert not guard.cross_site(environ())
    assert not guard.cross_site(environ(host="anything.example"))


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://127.0.0.1:8080", "sec_fetch_site": "same-origin"},
        {"origin": "http://127.0.0.1:8080"},  # a browser without fetch metadata
        {"sec_fetch_site": "same-origin"},
        {"sec_fetch_site": "none"},  # typed in the address bar
        # Behind a TLS proxy that nginx calls http: the browser's word for it.
        {"origin": "https://127.0.0.1:8080", "sec_fetch_site": "same-origin"},
    ],
)
def test_same_origin_requests_pass(headers: dict[str, str]) -> None:
    assert not Guard((), loopback_only=False).cross_site(environ(**headers))


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example", "sec_fetch_site": "cross-site"},
        {"origin": "https://evil.example"},  # an older browser: Origin only
        {"origin": "null", "sec_fetch_site": "cross-site"},  # a sandboxed frame
        {"origin": "null"},
        {"sec_fetch_site": "cross-site"},  # no Origin (a GET), still a cross-site page
        {"origin": "http://127.0.0.1:3000", "sec_fetch_site": "same-site"},  # another port
        {"sec_fetch_site": "same-site"},
        {"origin": "http://localhost:8080", "sec_fetch_site": "none"},  # another origin, whatever it says
    ],
)
def test_cross_site_requests_are_refused(headers: dict[str, str]) -> None:
    assert Guard((), loopback_only=False).cross_site(environ(**headers))
    # Only the exact origin listed lets them through.
    assert Guard(("https://app.example",), loopback_only=False).cross_site(environ(**headers))


def test_an_allowed_origin_passes_from_another_site_and_a_wildcard_allows_any() -> None:
    exact = Guard(("https://app.example",), loopback_only=False)
    cross = environ(origin="https://app.example", sec_fetch_site="cross-site")
    assert not exact.cross_site(cross)
    assert not exact.cross_site(environ(origin="https://app.example"))
    assert exact.cross_site(environ(origin="https://app.example.evil", sec_fetch_site="cross-site"))
    # Without an Origin, the site cannot be matched against the list.
    assert exact.cross_site(environ(sec_fetch_site="cross-site"))
    wildcard = Guard(("*",), loopback_only=False)
    assert not wildcard.cross_site(environ(origin="https://any.example", sec_fetch_site="cross-site"))


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("localhost", False),
        ("localhost:8080", False),
        ("127.0.0.1", False),
        ("127.0.0.1:8080", False),
        ("127.1.2.3:1", False),
        ("[::1]:8080", False),
        ("", True),
        ("herald.example", True),
        ("attacker.example:8080", True),  # DNS rebinding: the page's own name, now on 127.0.0.1
        ("192.168.1.10:8080", True),
        ("0.0.0.0:8080", True),
    ],
)
def test_without_a_token_only_loopback_hosts_may_publish(host: str, refused: bool) -> None:
    env = environ(host=host)
    if not host:
        del env["HTTP_HOST"]
    assert Guard((), loopback_only=True).remote_host(env) is refused
    assert not Guard((), loopback_only=False).remote_host(env)


def test_loopback_only_follows_the_token_and_publish_open() -> None:
    assert Config.from_env({}).loopback_only
    assert not Config.from_env({"PUBLISH_TOKEN": "t"}).loopback_only
    assert not Config.from_env({"PUBLISH_OPEN": "true"}).loopback_only
    assert Config.from_env({"PUBLISH_OPEN": "false"}).loopback_only
    with pytest.raises(ConfigError, match="PUBLISH_OPEN must be true or false"):
        Config.from_env({"PUBLISH_OPEN": "maybe"})


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.168.1.10", "::", "herald.example"])
def test_published_beyond_loopback_without_a_token_the_publisher_refuses_to_start(bind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"HERALD_BIND": bind})
    message = str(info.value)
    assert f"HERALD_BIND={bind}" in message
    assert "PUBLISH_TOKEN" in message and "PUBLISH_OPEN=true" in message
    # Either way out is accepted.
    assert Config.from_env({"HERALD_BIND": bind, "PUBLISH_TOKEN": "t"}).exposed
    assert Config.from_env({"HERALD_BIND": bind, "PUBLISH_OPEN": "true"}).publish_open


@pytest.mark.parametrize("bind", ["", "127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_on_loopback_no_token_is_needed(bind: str) -> None:
    config = Config.from_env({"HERALD_BIND": bind})
    assert not config.exposed and config.loopback_only


# -- data escaping -------------------------------------------------------------------


def test_line_separators_in_data_are_escaped_and_keep_their_value() -> None:
    data = {"text": "a\u2028b\u2029c\x85d", "k\u2028": ["\u2029"]}
    text = encode_data(data, 1000)
    assert text == '{"text":"a\\u2028b\\u2029c\\u0085d","k\\u2028":["\\u2029"]}'
    assert json.loads(text) == data
    assert text.splitlines() == [text]  # str.splitlines splits on all three
    # Other non-ASCII text stays as it is.
    assert encode_data("é ✓ 🚀", 1000) == '"é ✓ 🚀"'


def test_escaped_separators_count_toward_the_size_limit() -> None:
    assert encode_data("\u2028" * 10, 62) == '"' + "\\u2028" * 10 + '"'
    with pytest.raises(Exception, match="62 bytes"):
        encode_data("\u2028" * 10, 61)


@given(st.recursive(st.text() | st.integers() | st.none(), lambda c: st.lists(c, max_size=3), max_leaves=8))
def test_encoded_data_is_one_line_for_every_splitter(data: Any) -> None:
    text = encode_data(data, 1 << 20)
    assert json.loads(text) == data
    assert len(text.splitlines()) == 1 and not any(c in text for c in "\r\n\x85\u2028\u2029")
