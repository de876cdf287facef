"""The rendered pods, run as Docker containers: do their probes hit what the
images serve, and does the edge pod's nginx reach its stream worker over the
Unix socket?

The dev overlay's Redis, publisher, edge pod (nginx and a stream worker) and
webhook dispatcher are started the way their pod specs say, with webhooks
turned on as docs/kubernetes.md says (an overlay over dev that sets
WEBHOOK_URL, to a receiver on the same network, and WEBHOOKS=true): the same images (built locally from
this checkout), command and arguments, environment (ConfigMap, Secret,
downward API), user and groups (fsGroup), read-only root filesystem, no
capabilities, sysctls, memory limit, emptyDirs as tmpfs and ConfigMap volumes
as read-only files, and one network on which each Service's name (short and
<namespace>.svc.cluster.local) resolves to the pods it selects, with the
namespace's search domain, as in a cluster. The edge pod's two containers share
a network namespace and, as a tmpfs volume owned by the pod's fsGroup (mode
2770: only the group gets in), the emptyDir with the socket (tests/deploy/pods.py).

Then every probe is called as the kubelet would (HTTP: 200-399 passes; exec:
exit 0); one event is published and read back through nginx, which finds the
publisher through the resolver and domain its entrypoint took from
/etc/resolv.conf, and the stream worker through its socket; and a stream open
through nginx is followed while the edge pod is stopped as the kubelet stops
it: it must end cleanly, after the preStop, with nginx still running. A
stream opened and closed through nginx makes the dispatcher POST
channel.occupied and channel.vacated, signed with the Secret's
WEBHOOK_SECRET; stopped as the kubelet stops it, the dispatcher gives its
lanes up within the grace period.

Bounded: about a minute and a half once the images are built.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from herald_client import verify_webhook

from tests.deploy.manifests import KUBERNETES, Doc, of_kind, render
from tests.deploy.pods import LOCAL, PROJECT, Pod, build_service_images, docker
from tests.support.docker import REDIS_IMAGE, require_docker

READY_WITHIN = 90.0
SOCKET = "/run/herald/stream-1.sock"
DISPATCHER = "webhook-dispatcher"
# The webhook receiver: a stand-in on the pods' network, on port 80 (one the
# dispatcher's NetworkPolicy lets out by default).
RECEIVER = "webhook-receiver"
WEBHOOK_URL = f"http://{RECEIVER}/hooks"
# Prints each POST (path, headers, body) as a JSON line on stdout; answers 204.
RECEIVER_SCRIPT = """
import http.server, json
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        line = {"path": self.path, "headers": dict(self.headers.items()), "body": body.decode()}
        print(json.dumps(line), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 80), Receiver).serve_forever()
"""


def dev_with_webhooks(directory: Path) -> list[Doc]:
    """The dev overlay with webhooks on, the way docs/kubernetes.md says: an
    overlay that sets WEBHOOK_URL and WEBHOOKS=true together (and a short
    vacated delay, so the test waits less)."""
    directory.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUBERNETES / "overlays" / "dev", directory)],
        "configMapGenerator": [
            {
                "name": "herald-settings",
                "behavior": "merge",
                "literals": [
                    f"WEBHOOK_URL={WEBHOOK_URL}",
                    "WEBHOOKS=true",
                    "WEBHOOK_VACATED_DELAY_SECONDS=1",
                ],
            }
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(directory)


@pytest.fixture(scope="module")
def network() -> Iterator[str]:
    require_docker("running the rendered pods")
    name = f"{PROJECT}-{uuid.uuid4().hex[:8]}"
    docker("network", "create", "--label", f"{PROJECT}=1", name)
    try:
        yield name
    finally:
        leftovers = docker("ps", "-aq", "--filter", f"network={name}", check=False).stdout.split()
        if leftovers:
            docker("rm", "-f", "-v", *leftovers, check=False)
        docker("network", "rm", name, check=False)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    require_docker("running the rendered pods")
    built = build_service_images()
    if LOCAL:
        built["redis"] = REDIS_IMAGE
        built["nginx"] = "herald-local/nginx:bookworm"
    return built


@pytest.fixture(scope="module")
def receiver(network: str, images: dict[str, str]) -> Iterator[str]:
    """The webhook receiver's container (its log holds what it was sent)."""
    name = f"{network}-{RECEIVER}"
    docker(
        *("run", "-d", "--name", name, "--label", f"{PROJECT}=1", "--network", network),
        *("--network-alias", RECEIVER, "--sysctl", "net.ipv4.ip_unprivileged_port_start=0"),
        *("--user", "10001:10001", "--read-only", "--cap-drop", "ALL"),
        *(images["herald/publisher-service"], "python", "-c", RECEIVER_SCRIPT),
    )
    try:
        yield name
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def pods(
    tmp_path_factory: pytest.TempPathFactory, network: str, images: dict[str, str], receiver: str
) -> Iterator[dict[str, Pod]]:
    tmp = tmp_path_factory.mktemp("pods")
    docs = dev_with_webhooks(tmp / "dev-with-webhooks")
    namespace = next(doc["metadata"]["name"] for doc in of_kind(docs, "Namespace"))
    workloads = [doc for doc in of_kind(docs, "StatefulSet", "Deployment")]
    order = {"redis": 0, "publisher": 1, DISPATCHER: 2, "edge": 3}
    workloads.sort(key=lambda doc: order.get(doc["metadata"]["name"], 4))
    started: dict[str, Pod] = {}
    try:
        for workload in workloads:
            pod = Pod(workload, docs, namespace, images, tmp)
            started[pod.name] = pod
            pod.start(network)
        yield started
    finally:
        for pod in started.values():
            pod.remove()


@pytest.mark.timeout(600)
def test_every_probe_of_every_pod_passes_on_the_real_images(pods: dict[str, Pod]) -> None:
    assert set(pods) == {"redis", "publisher", "edge", DISPATCHER}
    assert set(pods["edge"].containers) == {"nginx", "stream"}
    assert set(pods[DISPATCHER].containers) == {"dispatcher"}
    deadline = time.monotonic() + READY_WITHIN
    # A pod is ready when every container of it is.
    waiting = {(pod.name, container): pod for pod in pods.values() for container in pod.containers}
    last: dict[tuple[str, str], str] = {}
    while waiting and time.monotonic() < deadline:
        for key, pod in list(waiting.items()):
            passed, last[key] = pod.probe("readinessProbe", key[1])
            if passed:
                del waiting[key]
        time.sleep(0.5)
    logs = "\n".join(pod.logs() for pod in {pod.name: pod for pod in waiting.values()}.values())
    assert not waiting, f"not ready within {READY_WITHIN} s: {last}\n{logs}"

    results = {}
    for name, pod in pods.items():
        for container in pod.containers.values():
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                if kind in container.spec:
                    results[f"{name}/{container.name} {kind}"] = container.probe(kind)
    failed = {key: what for key, (passed, what) in results.items() if not passed}
    assert not failed, f"{failed}\n" + "\n".join(pod.logs() for pod in pods.values())
    # The probes asked for the paths the manifests name, and the services know them.
    http = {what for passed, what in results.values() if what.startswith("GET")}
    assert {
        "GET /readyz on http: 200",  # the publisher, the webhook dispatcher
        "GET /healthz on http: 200",  # the publisher, nginx, the webhook dispatcher
        "GET /readyz on stream-http: 200",  # the edge pod's stream worker, on its TCP 8000
        "GET /healthz on stream-http: 200",
    } <= http, http


def nginx_log_lines(edge: Pod, path: str) -> list[str]:
    """nginx's access log lines (its stdout) for requests to `path`."""
    done = docker("logs", edge.containers["nginx"].docker_name, check=False)
    return [line for line in done.stdout.splitlines() if f" {path}?" in line or f" {path} " in line]


@pytest.mark.timeout(120)
def test_nginx_reaches_the_publisher_by_name_and_the_stream_worker_over_the_socket(
    pods: dict[str, Pod],
) -> None:
    edge = pods["edge"]
    nginx, stream = edge.containers["nginx"], edge.containers["stream"]
    base = f"http://127.0.0.1:{edge.port('http')}"
    token = pods["publisher"].env["PUBLISH_TOKEN"]
    channel = f"k8s.{uuid.uuid4().hex[:8]}"
    answer = requests.post(
        f"{base}/publish",
        json={"channel": channel, "data": {"from": "kubernetes"}},
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
        timeout=10,
    )
    assert answer.status_code == 202, f"{answer.status_code} {answer.text}\n{edge.logs()}"
    history = requests.get(f"{base}/history", params={"channel": channel}, timeout=10)
    assert history.status_code == 200, f"{history.status_code} {history.text}\n{edge.logs()}"
    assert '"kubernetes"' in history.text, history.text

    # The publisher by its Kubernetes name, through the resolver of resolv.conf.
    rendered = docker("exec", nginx.docker_name, "cat", "/etc/nginx/conf.d/herald.conf").stdout
    assert f"publisher-service.{edge.namespace}.svc.cluster.local:8000" in rendered
    assert "resolver 127.0.0.11" in rendered  # Docker's DNS here: the first nameserver of resolv.conf
    # The stream worker by its socket only: no name of a stream service at all.
    assert f"server unix:{SOCKET} " in rendered and rendered.count("server unix:") == 1, rendered
    assert "set $stream herald_streams;" in rendered and "stream-service" not in rendered
    # nginx's own access log says where /history went.
    lines = nginx_log_lines(edge, "/history")
    assert any(f'ua="unix:{SOCKET}"' in line for line in lines), lines

    # The socket is the stream worker's (it claimed slot 1), in the shared
    # directory, which nginx can enter (by group) but not write to (read-only).
    assert docker("exec", nginx.docker_name, "test", "-S", SOCKET, check=False).returncode == 0
    touched = docker("exec", nginx.docker_name, "touch", "/run/herald/nginx-was-here", check=False)
    assert touched.returncode != 0, "nginx's mount of the sockets is writable"
    stats = requests.get(f"http://127.0.0.1:{edge.port('stream-http')}/stats", timeout=10).json()
    assert stats["slot"] == 1, stats
    assert stream.env["STREAM_SOCKET_DIR"] == "/run/herald"


def received(receiver: str) -> list[dict[str, Any]]:
    """Every POST the receiver got, in order."""
    lines = docker("logs", receiver, check=False).stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_event(receiver: str, kind: str, channel: str, within: float) -> dict[str, Any]:
    """The first POST of a `kind` event for `channel` (alone or in a batch)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for post in received(receiver):
            body = json.loads(post["body"])
            events = body["data"]["events"] if body.get("type") == "batch" else [body]
            if any(e["type"] == kind and e["data"]["channel"] == channel for e in events):
                return post
        time.sleep(0.25)
    raise AssertionError(f"no {kind} for {channel} within {within} s: {received(receiver)}")


@pytest.mark.timeout(180)
def test_the_dispatcher_sends_signed_webhooks_when_a_channel_fills_and_empties(
    pods: dict[str, Pod], receiver: str
) -> None:
    """WEBHOOKS=true reaches the stream worker (it writes the occupancy events),
    WEBHOOK_URL, WEBHOOK_SECRET (from the Secret) and the settings reach the
    dispatcher, which holds every lane and POSTs both events, signed."""
    dispatcher, edge = pods[DISPATCHER], pods["edge"]
    assert edge.containers["stream"].env["WEBHOOKS"] == "true"
    assert dispatcher.env["WEBHOOK_URL"] == WEBHOOK_URL
    ready: dict[str, Any] = {}
    lanes = 8 * int(dispatcher.env["PARTITIONS"])  # one dispatcher in dev: all of them
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = requests.get(f"http://127.0.0.1:{dispatcher.port('http')}/readyz", timeout=5).json()
        if ready.get("lanes") == lanes:
            break
        time.sleep(0.5)
    assert ready == {"status": "ok", "webhooks": "on", "lanes": lanes}, f"{ready}\n{dispatcher.logs()}"

    base = f"http://127.0.0.1:{edge.port('http')}"
    channel = f"k8s.hooks.{uuid.uuid4().hex[:8]}"
    secret = dispatcher.env["WEBHOOK_SECRET"]
    response = requests.get(f"{base}/stream", params={"channel": channel}, stream=True, timeout=(5, 60))
    try:
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{edge.logs()}"
        occupied = wait_for_event(receiver, "channel.occupied", channel, 30)
    finally:
        response.close()
    vacated = wait_for_event(receiver, "channel.vacated", channel, 45)
    for post in (occupied, vacated):
        assert post["path"] == "/hooks"
        # Signed with the Secret's key: a receiver holding it accepts the POST.
        event = verify_webhook(post["body"].encode(), post["headers"], secret)
        assert event["data"] == {"channel": channel}, event
    metrics = requests.get(f"http://127.0.0.1:{dispatcher.port('http')}/metrics", timeout=5).text
    sent = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('herald_webhook_events_sent_total{endpoint="0"}')
    ]
    assert sent and sent[0] >= 2, sent


@pytest.mark.timeout(180)
def test_the_dispatcher_stops_within_its_grace_and_gives_its_lanes_up(pods: dict[str, Pod]) -> None:
    """Stopped as the kubelet stops it (no preStop, SIGTERM, SIGKILL at the grace
    period): it exits 0 in time, with every lease released and itself off the
    registry, so another dispatcher would take the lanes at once."""
    dispatcher, redis = pods[DISPATCHER], pods["redis"]
    grace = float(dispatcher.spec["terminationGracePeriodSeconds"])
    stopped = dispatcher.terminate()
    code, after = stopped["dispatcher"]
    assert code == 0 and after < grace, (stopped, dispatcher.logs())
    partitions = int(dispatcher.env["PARTITIONS"])
    leases = [f"herald:{{p{p}}}:hooks:lease:{lane}" for p in range(partitions) for lane in range(8)]
    held = docker("exec", redis.container_name, "redis-cli", "exists", *leases).stdout.strip()
    assert held == "0", f"{held} leases still held after a clean stop\n{dispatcher.logs()}"
    live = docker("exec", redis.container_name, "redis-cli", "zcard", "herald:{p0}:hooks:dispatchers")
    assert live.stdout.strip() == "0", live.stdout


@pytest.mark.timeout(180)
def test_a_stream_through_the_socket_ends_cleanly_when_the_edge_pod_stops(pods: dict[str, Pod]) -> None:
    """Last in this module: it stops the edge pod. While the stream worker's
    preStop runs (the pod is leaving the Service) the stream stays open; then
    the worker ends it, cleanly, through nginx, which is still running (its
    preStop is longer); then nginx drains and exits. Nothing is killed."""
    edge = pods["edge"]
    base = f"http://127.0.0.1:{edge.port('http')}"
    token = pods["publisher"].env["PUBLISH_TOKEN"]
    channel = f"k8s.{uuid.uuid4().hex[:8]}"
    response = requests.get(f"{base}/stream", params={"channel": channel}, stream=True, timeout=(5, 60))
    assert response.status_code == 200, f"{response.status_code} {response.text}\n{edge.logs()}"
    received: list[bytes] = []
    outcome: dict[str, object] = {}
    delivered = threading.Event()

    def read() -> None:
        try:
            for chunk in response.iter_content(chunk_size=None):
                received.append(chunk)
                if b"through-the-socket" in b"".join(received):
                    delivered.set()
            outcome["ended"] = time.monotonic()
        except requests.RequestException as error:
            outcome["error"] = repr(error)
            outcome["ended"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # Until the stream is subscribed, an event published is not live for it: publish until one arrives.
    deadline = time.monotonic() + 20
    while not delivered.is_set() and time.monotonic() < deadline:
        answer = requests.post(
            f"{base}/publish",
            json={"channel": channel, "data": "through-the-socket"},
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        delivered.wait(1)
    assert delivered.is_set(), f"no event through nginx within 20 s: {b''.join(received)!r}\n{edge.logs()}"
    stats = requests.get(f"http://127.0.0.1:{edge.port('stream-http')}/stats", timeout=10).json()
    assert stats["clients"] == 1, stats

    containers = {c.name: c.spec for c in edge.containers.values()}
    prestop = {
        name: float(spec["lifecycle"]["preStop"]["exec"]["command"][1]) for name, spec in containers.items()
    }
    grace = float(edge.spec["terminationGracePeriodSeconds"])
    started = time.monotonic()
    stopped = edge.terminate()
    reader.join(30)
    assert "ended" in outcome, "the stream is still open after the pod stopped"
    ended = float(outcome["ended"]) - started  # type: ignore[arg-type]
    logs = edge.logs(tail=20)
    assert "error" not in outcome, f"the stream was cut, not ended: {outcome['error']}\n{logs}"
    # Open while the pod left the endpoints, ended when the worker got SIGTERM.
    assert prestop["stream"] - 0.5 <= ended <= prestop["stream"] + 5, (ended, stopped, logs)
    # nginx ran until the stream had ended, then exited by itself.
    assert stopped["nginx"][1] > ended, (ended, stopped)
    assert {name: code for name, (code, _) in stopped.items()} == {"nginx": 0, "stream": 0}, (stopped, logs)
    assert all(after < grace for _, after in stopped.values()), (stopped, grace)
    # And nginx logged it as a stream of 200 through the socket.
    lines = nginx_log_lines(edge, "/stream")
    assert any(f'ua="unix:{SOCKET}"' in line and '" 200 ' in line for line in lines), lines
