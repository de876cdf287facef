"""The two services stay independent (no shared runtime library) but follow the
same conventions: each keeps its own copy of the code below, and these tests fail
as soon as the copies drift apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from publisher.config import ConfigError as PublisherConfigError
from publisher.config import _int as publisher_int
from publisher.config import _list as publisher_list
from publisher.config import _number as publisher_number
from stream.config import ConfigError as StreamConfigError
from stream.config import _int as stream_int
from stream.config import _list as stream_list
from stream.config import _number as stream_number

ROOT = Path(__file__).resolve().parents[2]
PUBLISHER = ROOT / "publisher-service"
STREAM = ROOT / "stream-service"
BEGIN = "# --- conventions shared with the other service"
END = "# --- end of the shared conventions"


def shared_block(path: Path) -> str:
    text = path.read_text()
    assert BEGIN in text and END in text, f"{path} lacks the shared-conventions markers"
    return text[text.index(BEGIN) : text.index(END)]


def functions(path: Path, names: set[str]) -> dict[str, str]:
    """The source of the named top-level functions of a module."""
    tree = ast.parse(path.read_text())
    found = {
        node.name: ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name in names
    }
    assert set(found) == names, f"{path} lacks {sorted(names - set(found))}"
    return found


def test_settings_are_parsed_by_the_same_rules() -> None:
    assert shared_block(PUBLISHER / "publisher" / "config.py") == shared_block(
        STREAM / "stream" / "config.py"
    )


def test_logs_are_set_up_the_same_way() -> None:
    publisher = (PUBLISHER / "publisher" / "logs.py").read_text()
    stream = (STREAM / "stream" / "logs.py").read_text()
    assert publisher == stream


def test_gunicorn_hooks_and_metrics_endpoint_are_the_same() -> None:
    hooks = {"on_starting", "child_exit"}
    assert functions(PUBLISHER / "gunicorn.conf.py", hooks) == functions(STREAM / "gunicorn.conf.py", hooks)
    endpoint = {"init_app"}
    assert functions(PUBLISHER / "publisher" / "metrics.py", endpoint) == functions(
        STREAM / "stream" / "metrics.py", endpoint
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 7), ("  ", 7), ("3", 3), (" 3 ", 3), ("2.0", 2), ("1e3", 1000), ("1.5", None), ("0", None),
     ("-1", None), ("abc", None), ("nan", None), ("inf", None), ("0x10", None)],
)  # fmt: skip
def test_both_services_read_a_whole_number_alike(raw: str, expected: int | None) -> None:
    env = {"X": raw}
    for read, error in ((publisher_int, PublisherConfigError), (stream_int, StreamConfigError)):
        if expected is None:
            with pytest.raises(error, match="X"):
                read(env, "X", 7, 1)
        else:
            assert read(env, "X", 7, 1) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 2.0), ("0.25", 0.25), ("3", 3.0), ("0.0001", None), ("-0.5", None), ("soon", None)],
)
def test_both_services_read_a_duration_in_seconds_alike(raw: str, expected: float | None) -> None:
    env = {"T_SECONDS": raw}
    for read, error in ((publisher_number, PublisherConfigError), (stream_number, StreamConfigError)):
        if expected is None:
            with pytest.raises(error, match="T_SECONDS"):
                read(env, "T_SECONDS", 2.0, 0.001)
        else:
            assert read(env, "T_SECONDS", 2.0, 0.001) == expected


def test_both_services_read_a_list_alike() -> None:
    env = {"L": " a, ,b,,c "}
    assert publisher_list(env, "L") == stream_list(env, "L") == ("a", "b", "c")


def test_durations_are_in_seconds_everywhere() -> None:
    # The one exception is RETRY_MS: the SSE `retry:` field it sets is in milliseconds.
    names = set()
    for config in (PUBLISHER / "publisher" / "config.py", STREAM / "stream" / "config.py"):
        names |= {
            node.value
            for node in ast.walk(ast.parse(config.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isupper()
        }
    in_ms = {n for n in names if n.endswith("_MS")}
    assert in_ms == {"RETRY_MS"}, f"durations must be *_SECONDS: {sorted(in_ms - {'RETRY_MS'})}"
