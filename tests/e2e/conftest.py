"""The end-to-end layer: the whole Compose stack, reached through nginx.

One stack per session, brought up the way a developer does it
(scripts/compose-local.sh up --build --wait, or HERALD_E2E_COMPOSE), under a
unique project name on a free loopback port, and always torn down with
`down -v`. Without Docker these tests are skipped, except in CI (CI=true),
where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import Stack, compose_command, free_port
from tests.support.docker import docker_available, in_ci

E2E_DIR = Path(__file__).parent
# Generous: the first test of a session also builds the images (and, on a fresh
# air-gapped machine, the local base images).
FIRST_TEST_TIMEOUT = 900
MEASUREMENTS: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: needs the whole Compose stack (Docker, images)")
    config.addinivalue_line("markers", "browser: needs headless Chromium and chromium-driver")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test here e2e, and give the first one time to build the stack."""
    first = True
    for item in items:
        if E2E_DIR not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if first and config.pluginmanager.hasplugin("timeout"):
            item.add_marker(pytest.mark.timeout(FIRST_TEST_TIMEOUT))
        first = False


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASUREMENTS:
        terminalreporter.section("herald e2e measurements")
        for key, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def measurements() -> dict[str, Any]:
    """Numbers measured by the tests, printed at the end of the run."""
    return MEASUREMENTS


def _require_docker_and_compose() -> None:
    problem = None
    if not docker_available():
        problem = "the e2e tests need Docker, and no Docker engine is reachable"
    else:
        tool = compose_command()[0]
        if shutil.which(tool) is None and not Path(tool).exists():
            problem = f"the e2e tests need {tool}"
    if problem is None:
        return
    if in_ci():
        pytest.fail(problem + " (CI must provide it)", pytrace=False)
    pytest.skip(problem)


# A second origin (another loopback port) for the cross-origin tests
# (test_cross_origin.py): its port is picked before the stack starts, so that
# the stack's CORS_ALLOWED_ORIGINS can list it.
CROSS_ORIGIN_PORT = free_port()
CROSS_ORIGIN = f"http://127.0.0.1:{CROSS_ORIGIN_PORT}"

# Small timings so the suite is quick; a token so /publish is not open.
E2E_SETTINGS = {
    "HERALD_BIND": "127.0.0.1",
    "PUBLISH_TOKEN": "e2e-token-" + secrets.token_hex(4),
    # Private channels on (subscribe tokens signed with it).
    "SUBSCRIBE_SECRET": "e2e-secret-" + secrets.token_hex(16),
    "CORS_ALLOWED_ORIGINS": CROSS_ORIGIN,
    "HEARTBEAT_SECONDS": "2",
    "RETRY_MS": "500",
    "WATCHDOG_SECONDS": "3",
    "MAX_BODY_BYTES": "262144",
    # A quarter of it, as the defaults (1 MiB, 256 KiB): a batch is well over a
    # client's buffer (tests/e2e/test_bounded_work.py).
    "CLIENT_BUFFER_BYTES": "65536",
    # The hard limit in the same ratio (4 MiB to 256 KiB): still four batches.
    "CLIENT_BUFFER_MAX_BYTES": "1048576",
    "PUBLISH_RATE": "100r/s",
    "PUBLISH_BURST": "200",
    "GRACEFUL_TIMEOUT": "5",
    "STOP_GRACE_PERIOD": "10s",
    "LOG_LEVEL": "info",
    # test_capacity.py opens 5,000 streams from one address (nginx's loopback);
    # the limits per address are tested on the front_door stack below.
    "STREAMS_PER_IP": "10000",
}

# The front door's limits per client address, small enough to reach in a test
# (tests/e2e/test_front_door.py, test_log_secrets.py). Every test of that stack
# is "another client" by X-Forwarded-For, which nginx believes from the Docker
# networks the host's requests come from (REAL_IP_FROM, commas and spaces).
FRONT_DOOR_SETTINGS = {
    "STREAMS_PER_IP": "3",
    "NGINX_MAX_STREAMS": "6",
    "READ_RATE": "1r/s",
    "READ_BURST": "4",
    "REAL_IP_FROM": "10.0.0.0/8, 172.16.0.0/12 192.168.0.0/16",
}


# HTTPS with HTTP/2 at the front door (tests/e2e/test_tls.py, docs/tls.md): a
# certificate from scripts/dev-cert.sh (added by the tls_stack fixture), the
# redirect from plain HTTP on, and 12 streams per client address: a browser's
# 12 streams over one HTTP/2 connection fit, a 13th is refused. Each curl of
# those tests is "another client" by X-Forwarded-For, as on the front_door stack.
TLS_SETTINGS = {
    "TLS_REDIRECT": "true",
    "STREAMS_PER_IP": "12",
    "REAL_IP_FROM": FRONT_DOOR_SETTINGS["REAL_IP_FROM"],
}


@contextlib.contextmanager
def running_stack(
    workdir: Path, overrides: dict[str, str] | None = None, files: tuple[str, ...] = ()
) -> Iterator[Stack]:
    """A whole stack with E2E_SETTINGS (plus `overrides`), up and healthy, under its
    own project name and port; torn down (with its volume) on exit. `files`: the
    compose files, when not just compose.yaml."""
    _require_docker_and_compose()
    project = f"herald-e2e-{os.getpid()}-{secrets.token_hex(3)}"
    port = free_port()
    settings = {
        **E2E_SETTINGS,
        **(overrides or {}),
        "HERALD_PORT": str(port),
        "COMPOSE_PROJECT_NAME": project,
    }
    env_file = workdir / "e2e.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    the_stack = Stack(
        project=project,
        port=port,
        env_file=env_file,
        token=settings["PUBLISH_TOKEN"],
        settings=settings,
        log_dir=workdir,
        files=files,
    )
    started = time.monotonic()
    try:
        the_stack.compose("up", "--build", "--wait", timeout=FIRST_TEST_TIMEOUT - 60, prepare=True)
        MEASUREMENTS.setdefault("stack up (build + wait healthy), s", round(time.monotonic() - started, 1))
        yield the_stack
    finally:
        _tear_down(the_stack, workdir)


def _tear_down(the_stack: Stack, workdir: Path) -> None:
    """Keep the logs for a post-mortem, then remove everything, volume included."""
    try:
        logs = the_stack.compose("logs", "--no-color", "--timestamps", timeout=60, check=False)
        (workdir / "compose.log").write_text(logs.stdout + logs.stderr)
        MEASUREMENTS.setdefault("compose logs", str(workdir / "compose.log"))
    except (subprocess.SubprocessError, OSError):
        pass
    down = the_stack.compose(
        "down", "-v", "--rmi", "local", "--remove-orphans", "--timeout", "10", timeout=180, check=False
    )
    if down.returncode != 0:  # never leave containers behind
        label = f"label=com.docker.compose.project={the_stack.project}"
        subprocess.run(
            f"docker ps -aq --filter {label} | xargs -r docker rm -f",
            shell=True,
            check=False,
            timeout=120,
        )
        subprocess.run(
            f"docker volume ls -q --filter {label} | xargs -r docker volume rm",
            shell=True,
            check=False,
            timeout=60,
        )
    the_stack.session.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack as E2E_SETTINGS configure it, shared by the session."""
    with running_stack(tmp_path_factory.mktemp("herald-e2e")) as the_stack:
        yield the_stack


@pytest.fixture(scope="session")
def front_door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with FRONT_DOOR_SETTINGS, shared by the tests of the front door's limits."""
    with running_stack(tmp_path_factory.mktemp("herald-e2e-front-door"), FRONT_DOOR_SETTINGS) as the_stack:
        yield the_stack


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with TLS_SETTINGS and a certificate for 127.0.0.1 and localhost
    signed by a local CA (scripts/dev-cert.sh; the CA is ca.pem beside
    TLS_CERT_FILE), HTTPS on its own free port (HERALD_TLS_PORT)."""
    workdir = tmp_path_factory.mktemp("herald-e2e-tls")
    cert_dir = workdir / "dev-cert"
    made = subprocess.run(
        ["sh", str(E2E_DIR.parents[1] / "scripts" / "dev-cert.sh"), str(cert_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    overrides = {
        **TLS_SETTINGS,
        "HERALD_TLS_PORT": str(free_port()),
        "TLS_CERT_FILE": str(cert_dir / "cert.pem"),
        "TLS_KEY_FILE": str(cert_dir / "key.pem"),
    }
    with running_stack(workdir, overrides) as the_stack:
        yield the_stack


@pytest.fixture
def channel() -> str:
    """A channel no other test uses."""
    return f"e2e.{secrets.token_hex(6)}"
