"""The two services stay independent (no shared runtime library) but follow the
same conventions: each keeps its own copy of the code in TWINS, and these tests
fail as soon as the copies drift apart, or a copy stops saying it is one."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

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
THIS_TEST = "tests/unit/test_conventions.py"


class Twins(NamedTuple):
    """A file of each service that must match its twin in the other: all of it,
    the named top-level functions, or the block between BEGIN and END."""

    stream: str
    publisher: str
    functions: tuple[str, ...] = ()
    block: bool = False


# Every copy one service keeps of the other's code. Each file says so at its
# top ("# Twins: ..."), or at the top of its block (BEGIN).
TWINS = {
    "logs": Twins("stream-service/stream/logs.py", "publisher-service/publisher/logs.py"),
    "metrics endpoint": Twins(
        "stream-service/stream/metrics.py", "publisher-service/publisher/metrics.py", functions=("init_app",)
    ),
    "gunicorn hooks": Twins(
        "stream-service/gunicorn.conf.py",
        "publisher-service/gunicorn.conf.py",
        functions=("on_starting", "child_exit"),
    ),
    "gunicorn's own errors as JSON": Twins(
        "stream-service/stream/server.py", "publisher-service/publisher/server.py", functions=("write_error",)
    ),
    "JSON errors": Twins(
        "stream-service/stream/errors.py",
        "publisher-service/publisher/errors.py",
        functions=("http_error", "unexpected"),
    ),
    "settings rules": Twins(
        "stream-service/stream/config.py", "publisher-service/publisher/config.py", block=True
    ),
    # The occupancy scripts: the stream service writes with them, the webhook
    # dispatcher (run from the publisher's image) sweeps with them.
    "Lua script runner": Twins(
        "stream-service/stream/contract.py", "publisher-service/dispatcher/contract.py", functions=("Script",)
    ),
    "occupancy": Twins("stream-service/stream/occupancy.py", "publisher-service/dispatcher/occupancy.py"),
}


def shared_block(path: Path) -> str:
    text = path.read_text()
    assert BEGIN in text and END in text, f"{path} lacks the shared-conventions markers"
    return text[text.index(BEGIN) : text.index(END)]


def functions(path: Path, names: set[str]) -> dict[str, str]:
    """The source of the named top-level functions (or classes) of a module."""
    tree = ast.parse(path.read_text())
    found = {
        node.name: ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in names
    }
    assert set(found) == names, f"{path} lacks {sorted(names - set(found))}"
    return found


def leading_comment(text: str) -> str:
    """The comment lines `text` starts with, without their `#`, as one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def header(path: Path) -> str:
    """The comment a file starts with: where a copy names its twin."""
    return leading_comment(path.read_text())


def shared_part(path: Path, twins: Twins) -> object:
    """What of `path` must equal its twin."""
    if twins.block:
        return shared_block(path)
    if twins.functions:
        return functions(path, set(twins.functions))
    return path.read_text()


@pytest.mark.parametrize("twins", TWINS.values(), ids=TWINS.keys())
def test_twins_match(twins: Twins) -> None:
    assert shared_part(ROOT / twins.stream, twins) == shared_part(ROOT / twins.publisher, twins)


@pytest.mark.parametrize("twins", TWINS.values(), ids=TWINS.keys())
def test_every_copy_names_its_twin(twins: Twins) -> None:
    for path, twin in ((twins.stream, twins.publisher), (twins.publisher, twins.stream)):
        if twins.block:
            # BEGIN itself says "shared with the other service".
            declared = leading_comment(shared_block(ROOT / path))
            assert THIS_TEST in declared, f"{path}: the shared block must say which test checks it"
            continue
        declared = header(ROOT / path)
        assert declared.startswith("Twins:"), f"{path} must start with '# Twins: ...' naming {twin}"
        named = [twin, THIS_TEST, *(f"{name}()" for name in twins.functions)]
        missing = [name for name in named if name not in declared]
        assert not missing, f"{path}: its '# Twins:' header does not name {missing}"


def test_every_declared_copy_is_checked() -> None:
    """A file that declares a twin (or holds a shared block) is in TWINS, so that
    the two are compared."""
    listed = {path for twins in TWINS.values() for path in (twins.stream, twins.publisher)}
    declaring = {
        str(path.relative_to(ROOT))
        for service in (PUBLISHER, STREAM)
        for path in service.rglob("*.py")
        if "wheels" not in path.parts and (header(path).startswith("Twins:") or BEGIN in path.read_text())
    }
    assert declaring == listed, f"declared but not in TWINS: {sorted(declaring - listed)}"


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
