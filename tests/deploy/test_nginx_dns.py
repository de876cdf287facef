"""nginx/entrypoint.sh's DNS settings: Compose's behaviour when unset (Docker's
DNS, names as written), the cluster's when `auto` (/etc/resolv.conf), explicit
values, and a refusal of anything that could end an nginx directive."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "nginx" / "entrypoint.sh"
FAKE_IMAGE_ENTRYPOINT = """#!/bin/sh
printf '%s\\n' "$HERALD_RESOLVER" "$HERALD_SERVICE_DOMAIN"
"""


def run(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("sed") is None or shutil.which("mkfifo") is None:
        pytest.skip("needs sed and mkfifo")
    fake = tmp_path / "docker-entrypoint.sh"
    fake.write_text(FAKE_IMAGE_ENTRYPOINT)
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HERALD_IMAGE_ENTRYPOINT": str(fake), **settings}
    return subprocess.run(
        ["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_unset_is_what_compose_always_had(tmp_path: Path) -> None:
    done = run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["127.0.0.11", ""]


def test_explicit_values(tmp_path: Path) -> None:
    done = run(
        tmp_path, NGINX_RESOLVER="10.96.0.10 [fd00::a]", NGINX_SERVICE_DOMAIN="herald.svc.cluster.local"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["10.96.0.10 [fd00::a]", ".herald.svc.cluster.local"]


def test_auto_reads_resolv_conf(tmp_path: Path) -> None:
    # A pod's resolv.conf on Kubernetes.
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(
        "search herald.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n"
    )
    auto = {"NGINX_RESOLVER": "auto", "NGINX_SERVICE_DOMAIN": "auto"}
    done = run(tmp_path, **auto, HERALD_RESOLV_CONF=str(resolv_conf))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["10.96.0.10 [fd00::a] ", ".herald.svc.cluster.local"]


def test_auto_without_a_nameserver_stops_nginx(tmp_path: Path) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("options ndots:5\n")
    done = run(tmp_path, NGINX_RESOLVER="auto", HERALD_RESOLV_CONF=str(resolv_conf))
    assert done.returncode == 1 and "no nameserver" in done.stderr


@pytest.mark.parametrize(
    "settings",
    [
        {"NGINX_RESOLVER": "10.0.0.1; include /etc/passwd"},
        {"NGINX_RESOLVER": "dns.example"},
        {"NGINX_SERVICE_DOMAIN": "ns.svc.cluster.local:80"},
        {"NGINX_SERVICE_DOMAIN": "a;b"},
    ],
)
def test_values_nginx_cannot_take_stop_it(tmp_path: Path, settings: dict[str, str]) -> None:
    done = run(tmp_path, **settings)
    assert done.returncode == 1
    assert "herald-nginx: NGINX_" in done.stderr
