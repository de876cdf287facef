"""publisher.validation: what a publish request may contain, and the error for everything else."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from publisher.validation import (
    DEFAULT_EVENT,
    Event,
    InvalidRequest,
    encode_data,
    event_from_fields,
    event_from_form,
    events_from_json,
    parse_json,
)

MAX_BATCH = 100
MAX_BYTES = 65536


def one(doc: Any, max_bytes: int = MAX_BYTES) -> Event:
    events, batch = events_from_json(doc, MAX_BATCH, max_bytes)
    assert not batch
    (event,) = events
    return event


@contextmanager
def refused(status: int, code: str | None = None) -> Iterator[None]:
    """The block raises InvalidRequest with this status (and code) and a message."""
    with pytest.raises(InvalidRequest) as info:
        yield
    assert info.value.status == status, (info.value.status, info.value.message)
    if code is not None:
        assert info.value.code == code, (info.value.code, info.value.message)
    assert info.value.message


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "chat.room-1", "user:42", "a_b", "x" * 128, "a.b:c-d_e.F9", "...", "-"]
)
def test_valid_channel_names(name: str) -> None:
    assert one({"channel": name, "data": 1}).channel == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 129,
        "a b",
        "a/b",
        "a\nb",
        "a\n",
        "a\r",
        "a\x00",
        "\t",
        "é",
        "caf\u00e9",
        "\uff46\uff55\uff4c\uff4c",  # full-width letters
        "٣",  # an Arabic-Indic digit: \d would match it, the rule does not
        "a*",
        "a?b",
        "herald live",
        "\ud800",
    ],
)
def test_invalid_channel_names_are_refused(name: str) -> None:
    with refused(400, "invalid_event"):
        one({"channel": name, "data": 1})


@pytest.mark.parametrize("name", ["e", "tick", "user.joined", "a:b-c_d", "x" * 64])
def test_valid_event_names(name: str) -> None:
    assert one({"channel": "c", "event": name, "data": 1}).event == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a\nb", "a\rb", "a\x00", "ünï", "\u2028", "a,b"])
def test_invalid_event_names_are_refused(name: str) -> None:
    with refused(400, "invalid_event"):
        one({"channel": "c", "event": name, "data": 1})


@pytest.mark.parametrize("name", ["reset", "token_expired"])
def test_the_event_names_herald_sends_itself_are_reserved(name: str) -> None:
    # A published `reset` would pass for Herald's own with every client.
    with refused(400, "invalid_event"):
        one({"channel": "c", "event": name, "data": 1})
    assert one({"channel": "c", "event": name + "s", "data": 1}).event == name + "s"


@pytest.mark.parametrize("value", [1, None, True, ["a"], {"a": 1}, 1.5])
def test_non_string_names_are_refused(value: Any) -> None:
    with refused(400, "invalid_event"):
        one({"channel": value, "data": 1})
    with refused(400, "invalid_event"):
        one({"channel": "c", "event": value, "data": 1})


def test_event_defaults_to_message() -> None:
    assert DEFAULT_EVENT == "message"
    assert one({"channel": "c", "data": 1}).event == "message"


# -- fields ------------------------------------------------------------------


def test_data_is_required_and_may_be_any_json_value() -> None:
    with refused(400, "invalid_event"):
        one({"channel": "c"})
    with refused(400, "invalid_event"):
        one({"channel": "c", "event": "e"})
    cases: list[tuple[Any, str]] = [
        (None, "null"),
        (0, "0"),
        ("", '""'),
        ([], "[]"),
        ({}, "{}"),
        (False, "false"),
    ]
    for value, text in cases:
        assert one({"channel": "c", "data": value}).data == text


def test_channel_is_required() -> None:
    with refused(400, "invalid_event"):
        one({"data": 1})


@pytest.mark.parametrize("extra", ["id", "retry", "Data", "channels", ""])
def test_unknown_fields_are_refused(extra: str) -> None:
    with refused(400, "invalid_event"):
        one({"channel": "c", "data": 1, extra: "x"})


def test_data_is_stored_as_compact_json_keeping_unicode() -> None:
    event = one({"channel": "c", "data": {"b": [1, 2, {"x": None}], "a": "héllo ✓", "n": 1.5}})
    assert event.data == '{"b":[1,2,{"x":null}],"a":"héllo ✓","n":1.5}'
    assert json.loads(event.data) == {"b": [1, 2, {"x": None}], "a": "héllo ✓", "n": 1.5}


# -- strict JSON -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"channel":"c","data":1,"data":2}',
        b'{"channel":"c","channel":"d","data":1}',
        b'{"channel":"c","data":{"a":1,"a":1}}',
        b'[{"channel":"c","data":1},{"channel":"c","data":[{"k":1,"k":2}]}]',
    ],
)
def test_duplicate_keys_are_refused_at_any_depth(body: bytes) -> None:
    with refused(400, "invalid_json"):
        parse_json(body)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_are_refused(constant: bytes) -> None:
    with refused(400, "invalid_json"):
        parse_json(b'{"channel":"c","data":' + constant + b"}")


def test_a_number_that_overflows_to_infinity_is_refused() -> None:
    doc = parse_json(b'{"channel":"c","data":1e400}')
    with refused(400, "invalid_event"):
        one(doc)


def test_non_finite_python_floats_are_refused_by_encode_data() -> None:
    for value in (float("nan"), float("inf"), [float("-inf")]):
        with refused(400, "invalid_event"):
            encode_data(value, MAX_BYTES)


def test_an_integer_too_long_to_parse_is_a_400() -> None:
    with refused(400, "invalid_json"):
        parse_json(b'{"channel":"c","data":' + b"9" * 5000 + b"}")


@pytest.mark.parametrize("depth", [2000, 100_000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth: int) -> None:
    with refused(400, "invalid_json"):
        parse_json(b"[" * depth + b"]" * depth)
    with refused(400, "invalid_json"):
        parse_json(b'{"channel":"c","data":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")


def test_deeply_nested_python_data_is_a_400_when_encoding() -> None:
    data: list[Any] = []
    inner = data
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    with refused(400, "invalid_event"):
        encode_data(data, 10**9)


@pytest.mark.parametrize(
    "body",
    [b"\xff", b'{"channel":"c","data":"\xc3"}', b'{"channel":"c","data":"\xed\xa0\x80"}', b"\xc0\xaf"],
)
def test_invalid_utf8_is_refused(body: bytes) -> None:
    with refused(400, "invalid_json"):
        parse_json(body)


@pytest.mark.parametrize("body", [b"", b" ", b"\n\t\r "])
def test_empty_body_is_refused(body: bytes) -> None:
    with refused(400, "invalid_json"):
        parse_json(body)


@pytest.mark.parametrize(
    "body", [b"{", b'{"channel":}', b"{'a':1}", b"[1,]", b'{"a":1} x', b"\xef\xbb\xbf{}"]
)
def test_malformed_json_is_refused(body: bytes) -> None:
    with refused(400, "invalid_json"):
        parse_json(body)


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud83d", "a\\udc00b"])
def test_lone_surrogates_in_data_are_refused(escape: str) -> None:
    doc = parse_json(('{"channel":"c","data":"' + escape + '"}').encode())
    with refused(400, "invalid_event"):
        one(doc)
    # As an object key too.
    doc = parse_json(('{"channel":"c","data":{"' + escape + '":1}}').encode())
    with refused(400, "invalid_event"):
        one(doc)


def test_an_escaped_surrogate_pair_is_a_valid_character() -> None:
    doc = parse_json(b'{"channel":"c","data":"\\ud83d\\ude80"}')
    assert one(doc).data == '"🚀"'


@pytest.mark.parametrize("doc", [1, "x", None, True, 1.5])
def test_the_body_must_be_an_object_or_array(doc: Any) -> None:
    with refused(400):
        events_from_json(doc, MAX_BATCH, MAX_BYTES)


# -- sizes -------------------------------------------------------------------


def test_event_size_is_the_utf8_size_of_compact_json() -> None:
    # '"éééé"' is 2 + 4 * 2 = 10 bytes in UTF-8 (but only 6 characters).
    assert one({"channel": "c", "data": "éééé"}, max_bytes=10).data == '"éééé"'
    with refused(413, "event_too_large"):
        one({"channel": "c", "data": "ééééé"}, max_bytes=10)
    # Compact: no spaces after ',' and ':' count against the limit.
    assert one({"channel": "c", "data": {"a": [1, 2]}}, max_bytes=13).data == '{"a":[1,2]}'
    with refused(413, "event_too_large"):
        one({"channel": "c", "data": {"a": [1, 2]}}, max_bytes=10)
    # An emoji is 4 bytes.
    assert one({"channel": "c", "data": "🚀"}, max_bytes=6).data == '"🚀"'
    with refused(413, "event_too_large"):
        one({"channel": "c", "data": "🚀"}, max_bytes=5)


def test_event_size_counts_json_escapes() -> None:
    # A newline is two bytes once escaped ("\n"); a control character six ("\u0001").
    assert one({"channel": "c", "data": "\n"}, max_bytes=4).data == '"\\n"'
    with refused(413, "event_too_large"):
        one({"channel": "c", "data": "\n"}, max_bytes=3)
    with refused(413, "event_too_large"):
        one({"channel": "c", "data": "\x01"}, max_bytes=7)


# -- batches -----------------------------------------------------------------


def test_batch_keeps_order_and_says_it_is_a_batch() -> None:
    doc = [{"channel": f"c{i}", "event": "e", "data": i} for i in range(5)]
    events, batch = events_from_json(doc, MAX_BATCH, MAX_BYTES)
    assert batch
    assert [(e.channel, e.data) for e in events] == [(f"c{i}", str(i)) for i in range(5)]


def test_batch_of_one_is_still_a_batch() -> None:
    events, batch = events_from_json([{"channel": "c", "data": 1}], MAX_BATCH, MAX_BYTES)
    assert batch
    assert len(events) == 1


def test_empty_batch_is_refused() -> None:
    with refused(400, "empty_batch"):
        events_from_json([], MAX_BATCH, MAX_BYTES)


def test_batch_at_max_is_accepted_and_over_max_is_413() -> None:
    item = {"channel": "c", "data": 1}
    events, _ = events_from_json([item] * 3, 3, MAX_BYTES)
    assert len(events) == 3
    with refused(413, "batch_too_large"):
        events_from_json([item] * 4, 3, MAX_BYTES)


@pytest.mark.parametrize("bad", [1, "x", None, [], [{"channel": "c", "data": 1}]])
def test_batch_items_must_be_objects(bad: Any) -> None:
    with refused(400, "invalid_event"):
        events_from_json([{"channel": "c", "data": 1}, bad], MAX_BATCH, MAX_BYTES)


def test_batch_error_names_the_failing_item() -> None:
    doc = [{"channel": "c", "data": 1}, {"channel": "c", "data": 2}, {"channel": "bad name", "data": 3}]
    with pytest.raises(InvalidRequest) as info:
        events_from_json(doc, MAX_BATCH, MAX_BYTES)
    assert info.value.status == 400
    assert "item 2" in info.value.message


def test_one_oversized_event_fails_the_whole_batch() -> None:
    doc = [{"channel": "c", "data": "x"}, {"channel": "c", "data": "x" * 100}]
    with refused(413, "event_too_large"):
        events_from_json(doc, MAX_BATCH, 50)


# -- forms -------------------------------------------------------------------


def test_form_data_is_taken_as_a_string() -> None:
    event = event_from_form({"channel": ["c"], "data": ['{"a": 1}']}, MAX_BYTES)
    assert event == Event("c", "message", '"{\\"a\\": 1}"')
    assert json.loads(event.data) == '{"a": 1}'
    assert event_from_form({"channel": ["c"], "data": ["42"]}, MAX_BYTES).data == '"42"'
    assert event_from_form({"channel": ["c"], "data": [""]}, MAX_BYTES).data == '""'


def test_form_event_name_and_control_characters() -> None:
    event = event_from_form({"channel": ["c"], "event": ["tick"], "data": ["a\r\nb\x00"]}, MAX_BYTES)
    assert event.event == "tick"
    assert event.data == '"a\\r\\nb\\u0000"'


def test_repeated_form_fields_are_refused() -> None:
    for field in ("channel", "data", "event"):
        form = {"channel": ["c"], "data": ["x"], "event": ["e"]}
        form[field] = form[field] * 2
        with refused(400, "invalid_event"):
            event_from_form(form, MAX_BYTES)


def test_form_requires_data_and_channel_and_refuses_unknown_fields() -> None:
    with refused(400, "invalid_event"):
        event_from_form({"channel": ["c"]}, MAX_BYTES)
    with refused(400, "invalid_event"):
        event_from_form({"data": ["x"]}, MAX_BYTES)
    with refused(400, "invalid_event"):
        event_from_form({"channel": ["c"], "data": ["x"], "token": ["t"]}, MAX_BYTES)
    with refused(400, "invalid_event"):
        event_from_form({"channel": ["bad name"], "data": ["x"]}, MAX_BYTES)


def test_form_data_size_limit() -> None:
    assert event_from_form({"channel": ["c"], "data": ["x" * 8]}, 10).data == '"' + "x" * 8 + '"'
    with refused(413, "event_too_large"):
        event_from_form({"channel": ["c"], "data": ["x" * 9]}, 10)


def test_raw_data_must_be_a_string() -> None:
    with refused(400, "invalid_event"):
        event_from_fields({"channel": "c", "data": 1}, MAX_BYTES, raw_data=True)


# -- encoded data can never break an SSE frame ---------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_text, children, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_encoded_data_has_no_raw_line_ends_or_nul_and_round_trips(value: Any) -> None:
    text = encode_data(value, 10**9)
    assert "\r" not in text
    assert "\n" not in text
    assert "\x00" not in text
    assert json.loads(text) == value


@given(st.text(alphabet=st.sampled_from("\r\n\x00a \u2028")))
def test_control_characters_in_strings_are_escaped(value: str) -> None:
    text = encode_data({"s": value, value: 1}, 10**9)
    assert not set(text) & {"\r", "\n", "\x00"}
    assert json.loads(text) == {"s": value, value: 1}
