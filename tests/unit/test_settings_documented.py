"""Every setting is documented: compose.yaml's variables in .env.example, and every
variable a service reads is passed by compose.yaml."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compose_variables() -> set[str]:
    text = (ROOT / "compose.yaml").read_text()
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))


def test_every_compose_variable_is_in_env_example() -> None:
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    missing = compose_variables() - documented
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_every_variable_a_service_reads_is_passed_by_compose() -> None:
    compose = (ROOT / "compose.yaml").read_text()
    for service in (
        "publisher-service/publisher/config.py",
        "publisher-service/dispatcher/config.py",
        "stream-service/stream/config.py",
    ):
        read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', (ROOT / service).read_text()))
        missing = {name for name in read if f"{name}:" not in compose}
        assert not missing, f"{service} reads {sorted(missing)}, which compose.yaml never sets"
