"""The load tool runs end to end at small sizes: correctness only, never speed.

`python -m tests.load.bench --mode direct --quick` starts its own Redis,
services and nginx, runs every scenario on both paths with a few dozen clients,
and the fan-out on the nchan reference too, and must exit 0 with every
subscriber having got every event exactly once, in order, and a JSON report
with every scenario's figures. The same with `--transport tcp` (fan-out only)
records that transport. `--quick` in the default compose mode (about 30 s) does
the same against the Compose stack, on both paths to nginx, and must leave no
container behind. The figures themselves are not judged here: they depend on
the machine (see docs/benchmark.md). A few checks of the options need no stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import compose_command
from tests.load.bench import parse_args
from tests.load.compose import bench_settings, compose_env
from tests.load.nchan import find_module
from tests.load.stack import TEMPLATE, find_nginx, render_server
from tests.support.docker import REDIS_IMAGE, docker_available, in_ci, require_docker
from tests.support.services import ROOT

DELIVERY_KEYS = {
    "streams",
    "events_each",
    "expected_deliveries",
    "received",
    "errors",
    "complete",
    "latency_ms",
    "stream_cpu_us_per_delivery",
    "deliveries_per_s",
}
PUBLISH_KEYS = {"requests", "statuses", "complete", "requests_per_s", "events_per_s", "latency_ms"}
PUBLISH_KEYS |= {"publisher_cpu_us_per_request"}


def assert_delivered(name: str, result: dict[str, Any]) -> None:
    assert result.keys() >= DELIVERY_KEYS, f"{name}: missing {DELIVERY_KEYS - result.keys()}"
    assert result["received"] == result["expected_deliveries"] > 0, name
    assert result["errors"] == 0, f"{name}: gaps, duplicates or disorder"
    assert result["complete_streams"] == result["streams"], name
    assert result["complete"] is True, name


def nchan_available() -> bool:
    """The nchan reference can run: the module is there, or the bench may install it (root, CI)."""
    return find_module() is not None or (in_ci() and os.geteuid() == 0)


def run_direct(out: Path, *args: str, timeout: float = 150) -> tuple[dict[str, Any], str]:
    """`bench --mode direct --quick ARGS` (skipped without nginx or Docker); its report and output."""
    if find_nginx() is None and not in_ci():
        pytest.skip("the bench needs nginx: sudo apt-get install -y nginx (in CI the bench installs it)")
    if not os.environ.get("REDIS_URL"):
        require_docker("the bench smoke test")
    # The same Redis image as the integration tests (pinned, or the local stand-in).
    env = {**os.environ, "HERALD_TEST_REDIS_IMAGE": REDIS_IMAGE}
    command = [sys.executable, "-m", "tests.load.bench", "--mode", "direct", "--quick", "--json", str(out)]
    run = subprocess.run(
        [*command, "--max-seconds", "90", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, output
    report = json.loads(out.read_text())
    assert report["ok"] is True, output
    assert report["errors"] == {}, output
    return report, output


def test_quick_bench_delivers_every_event_in_order(tmp_path: Path) -> None:
    reference = nchan_available()
    report, output = run_direct(tmp_path / "bench.json", *(() if reference else ("--no-reference",)))
    assert report["transport"] == "unix" == report["stack"]["transport"]
    results = report["results"]

    assert set(results["idle"]) == {"direct"}
    idle = results["idle"]["direct"]
    assert idle["live"] == idle["held_by_worker"] == idle["connections"] == 50
    assert {"rss_kb_per_connection", "idle_cpu_percent"} <= idle.keys()

    assert set(results["fanout"]) == {"direct", "nginx"}
    for path, result in results["fanout"].items():
        assert_delivered(f"fanout/{path}", result)
        assert result["streams"] == 50 and result["events_each"] == 20

    assert set(results["publish"]) == {"direct", "nginx"}
    for path, result in results["publish"].items():
        for kind in ("single", "batched"):
            figures = result[kind]
            assert figures.keys() >= PUBLISH_KEYS, f"publish/{path}/{kind}"
            assert figures["statuses"] == {"202": figures["requests"]}, f"publish/{path}/{kind}"
            assert figures["stored_events"] >= figures["events"], f"publish/{path}/{kind}"
        assert result["single"]["requests"] == 200

    if reference:
        # nchan's fan-out, right after Herald's: the same clients, sizes and checks.
        assert report["reference"] == "nchan"
        nchan = results["reference"]["nchan"]
        assert_reference(nchan, streams=50, events=20)
        assert "fan-out vs nchan" in output and "nchan (reference)" in output, output

    assert_delivered("many-channels", results["many-channels"])

    assert set(results["scaling"]) == {"50", "100", "200"}
    for size, result in results["scaling"].items():
        assert_delivered(f"scaling/{size}", result)

    names = {t["name"] for t in report["targets"]}
    assert {"delivery", "idle RSS", "fan-out CPU flat", "publishes/s (nginx)"} <= names
    assert all(t["status"] in {"PASS", "MISS", "n/a"} for t in report["targets"])
    delivery = next(t for t in report["targets"] if t["name"] == "delivery")
    assert delivery["status"] == "PASS"


REFERENCE_KEYS = (DELIVERY_KEYS - {"stream_cpu_us_per_delivery"}) | {
    "server_cpu_us_per_delivery",
    "reference",
}


def assert_reference(result: dict[str, Any], *, streams: int, events: int) -> None:
    """The nchan reference's fan-out: complete, in order, its nginx's CPU counted."""
    assert result.keys() >= REFERENCE_KEYS, f"missing {REFERENCE_KEYS - result.keys()}"
    assert result["received"] == result["expected_deliveries"] == streams * events
    assert result["errors"] == 0 and result["complete"] is True
    assert result["counted"] == ["nginx"] and result["cpu_s"]["nginx"] >= 0
    assert result["nchan_published"] == events
    assert result["reference"]["workers"] == 1
    assert result["open"]["live"] == streams


def test_quick_bench_tcp_transport_is_recorded(tmp_path: Path) -> None:
    """--transport tcp: nginx reaches the stream worker at its port; the report says so."""
    report, _ = run_direct(
        tmp_path / "bench.json", "--transport", "tcp", "--scenario", "fanout", "--no-reference"
    )
    assert report["transport"] == "tcp" == report["stack"]["transport"]
    assert report["reference"] is None and "reference" not in report["results"]
    assert "over tcp" in report["routes"]["nginx"]["via"]
    for path, result in report["results"]["fanout"].items():
        assert_delivered(f"fanout/{path}", result)


def test_transport_and_reference_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The options' defaults and checks, the Compose setting and nginx's stream target: no stack."""
    args = parse_args([])
    assert (args.mode, args.transport, args.reference) == ("compose", "unix", "nchan")
    args = parse_args(["--transport", "tcp", "--scenario", "fanout", "--no-reference"])
    assert (args.transport, args.reference) == ("tcp", "none")
    assert parse_args(["--mode", "direct", "--scenario", "idle"]).reference == "none"
    assert parse_args(["--mode", "direct", "--transport", "tcp"]).transport == "tcp"
    for wrong in (["--transport", "udp"], ["--scenario", "idle", "--reference", "nchan"]):
        with pytest.raises(SystemExit):
            parse_args(wrong)
    # Compose mode: STREAM_TRANSPORT reaches Compose, whatever the caller's shell exports.
    settings = bench_settings("p", 1, 10000, "tcp")
    assert settings["STREAM_TRANSPORT"] == "tcp"
    monkeypatch.setenv("STREAM_TRANSPORT", "unix")
    assert compose_env(settings)["STREAM_TRANSPORT"] == "tcp"
    # Direct mode: nginx's stream target as nginx/entrypoint.sh renders it for each transport.
    template, prefix = TEMPLATE.read_text(), Path("/tmp/x")
    tcp = render_server(template, listen=1, publisher=2, stream=3, prefix=prefix)
    socket = prefix / "stream-1.sock"
    unix = render_server(template, listen=1, publisher=2, stream=3, prefix=prefix, socket=socket)
    assert "set $stream 127.0.0.1:3;" in tcp
    assert "set $stream herald_streams;" in unix and "server unix:/tmp/x/stream-1.sock" in unix


def _require_compose_bench() -> None:
    """Docker, Compose and root (setns into nginx's network namespace), or skip (in CI: Docker is a must)."""
    if not docker_available():
        if in_ci():
            pytest.fail("the compose-mode bench needs Docker (CI must provide it)", pytrace=False)
        pytest.skip("the compose-mode bench needs Docker")
    tool = compose_command()[0]
    if shutil.which(tool) is None and not Path(tool).exists():
        pytest.skip(f"the compose-mode bench needs {tool}")
    if os.geteuid() != 0:
        pytest.skip("the compose-mode bench needs root: it enters nginx's network namespace (setns)")


def test_quick_compose_bench_measures_both_paths(tmp_path: Path) -> None:
    """The default mode: the Compose stack, via docker-proxy and inside nginx's netns, then removed."""
    _require_compose_bench()
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.load.bench", "--quick", "--json", str(out), "--max-seconds", "120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-4000:]}"
    assert run.returncode == 0, output
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == {}, output
    assert report["mode"] == "compose"
    assert report["transport"] == "unix" and report["stack"]["stream_target"] == "herald_streams"
    results = report["results"]
    for scenario in ("idle", "fanout", "publish"):
        assert set(results[scenario]) == {"proxy", "netns"}, scenario
    containers = {"nginx", "stream", "publisher", "redis"}
    for path, result in results["fanout"].items():
        assert_delivered(f"fanout/{path}", result)
        assert result["cpu_s"].keys() >= containers | {"docker-proxy"}
        assert result["server_cpu_us_per_delivery"] > 0
    assert results["fanout"]["proxy"]["cpu_s"]["docker-proxy"] > 0
    for path, result in results["idle"].items():
        assert result["held_by_worker"] == result["connections"] == 50, path
        assert result["rss_kb_per_connection_by"].keys() >= containers
    for path, result in results["publish"].items():
        for kind in ("single", "batched"):
            assert result[kind]["statuses"] == {"202": result[kind]["requests"]}, f"{path}/{kind}"
    assert_reference(results["reference"]["nchan"], streams=50, events=20)
    names = {t["name"] for t in report["targets"]}
    assert {"idle RSS (netns)", "fan-out CPU (proxy)", "publish CPU (netns)"} <= names
    assert {"fan-out CPU vs nchan (netns)", "fan-out p99 vs nchan (netns)"} <= names
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={report['stack']['project']}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert left.stdout.strip() == "", "the bench left containers behind"


def test_the_webhook_bench_runs_end_to_end_and_checks_delivery(tmp_path: Path) -> None:
    """`python -m tests.load.webhooks` at a small size, on a Redis of its own (it
    flushes it): every event delivered once, alternating, and each figure there."""
    require_docker("the webhook bench smoke test")
    from testcontainers.community.redis import RedisContainer

    with RedisContainer(REDIS_IMAGE) as container:
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        out = tmp_path / "webhooks.json"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.load.webhooks",
                "--channels",
                "60",
                "--redis-url",
                url,
                "--json",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["delivery"]["complete"] is True
    assert report["delivery"]["received"] == 120 and report["delivery"]["duplicates"] == 0
    assert report["latency"]["received"] == report["latency"]["events"]
    assert report["presence_on"]["redis_us_per_channel"] > 0 < report["presence_off"]["redis_us_per_channel"]


def test_the_tls_bench_runs_end_to_end_over_three_ways(tmp_path: Path) -> None:
    """`python -m tests.load.tls` at a small size: plain HTTP/1.1, HTTPS with
    HTTP/1.1 and HTTPS with HTTP/2 each deliver every event to every subscriber
    (the bench checks order and count), HTTP/2 on one connection."""
    require_docker("the TLS bench smoke test")
    out = tmp_path / "tls.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.load.tls", "--subscribers", "8", "--events", "10", "--rate", "50",
         "--max-seconds", "300", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["way"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"http/1.1", "https h1", "https h2"}
    assert all(row["deliveries"] == 80 and row["nginx us/delivery"] > 0 for row in rows.values())
    assert rows["https h2"]["client connections"] == 1
    assert rows["http/1.1"]["client connections"] == rows["https h1"]["client connections"] == 8
