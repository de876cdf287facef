"""Render deploy/kubernetes with kubectl's kustomize and read what it made.

kubectl is the one tool these tests need besides Python: without it a laptop
skips them (saying why), CI fails them (CI must run them).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.docker import in_ci

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())
# The Secret a real install creates itself (docs/kubernetes.md); only the dev
# overlay renders one.
EXTERNAL_SECRET = "herald-secrets"

Doc = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found:
        return found
    message = "the Kubernetes manifests are rendered with `kubectl kustomize`, and kubectl is not on PATH"
    if in_ci():
        pytest.fail(message + " (CI must provide kubectl >= 1.27, kustomize v5)", pytrace=False)
    pytest.skip(message)


@functools.cache
def _render(directory: Path) -> tuple[str, str]:
    """(rendered YAML, error); cached, rendering takes a fraction of a second each."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    return done.stdout, (done.stderr if done.returncode else "")


def render(directory: Path) -> list[Doc]:
    text, error = _render(directory)
    shown = directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory
    assert not error, f"kubectl kustomize {shown} failed:\n{error}"
    return [doc for doc in yaml.safe_load_all(text) if doc]


def overlay(name: str) -> list[Doc]:
    return render(KUBERNETES / "overlays" / name)


def documented_settings() -> set[str]:
    """Every setting .env.example documents (a KEY=value line)."""
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def of_kind(docs: list[Doc], *kinds: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] in kinds]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def pod_templates(docs: list[Doc]) -> list[tuple[Doc, Doc]]:
    """(workload, its pod template) for every workload."""
    return [(doc, doc["spec"]["template"]) for doc in of_kind(docs, *WORKLOAD_KINDS)]


def settings_map(docs: list[Doc]) -> Doc:
    """The ConfigMap of settings (its name carries kustomize's hash)."""
    found = [
        doc
        for doc in of_kind(docs, "ConfigMap")
        if re.fullmatch(r"herald-settings(-[a-z0-9]{10})?", doc["metadata"]["name"])
    ]
    assert len(found) == 1, "exactly one herald-settings ConfigMap"
    return found[0]


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels/matchExpressions, or a Service's plain map)."""
    if not selector:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return all(labels.get(key) == value for key, value in selector.items())
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True
