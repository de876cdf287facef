"""Where the test suite gets Docker and images from, and how it fails without them."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

# The official image, pinned; air-gapped machines point this at a local stand-in
# (scripts/build-local-images.sh builds herald-local/redis:bookworm).
REDIS_IMAGE = os.environ.get("HERALD_TEST_REDIS_IMAGE", "redis:7.4.2")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def require_docker(what: str) -> None:
    """Skip on a laptop without Docker; in CI a missing Docker is a failure."""
    if docker_available():
        return
    message = f"{what} needs Docker, and no Docker engine is reachable"
    if in_ci():
        pytest.fail(message + " (CI must provide it)", pytrace=False)
    pytest.skip(message + "; set REDIS_URL to use an existing Redis instead")
