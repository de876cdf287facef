"""The rendered pods, run as Docker containers: do their probes hit what the
images serve, and does the edge pod's nginx reach its stream worker over the
Unix socket?

The dev overlay's Redis, publisher and edge pod (nginx and a stream worker)
are started the way their pod specs say: the same images (built locally from
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
it: it must end cleanly, after the preStop, with nginx still running.

Bounded: about a minute once the images are built.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.deploy.manifests import of_kind, overlay
from tests.deploy.pods import LOCAL, PROJECT, Pod, build_service_images, docker
from tests.support.docker import REDIS_IMAGE, require_docker

READY_WITHIN = 90.0
SOCKET = "/run/herald/stream-1.sock"


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pod]]:
    require_docker("running the rendered pods")
    docs = overlay("dev")
    namespace = next(doc["metadata"]["name"] for doc in of_kind(docs, "Namespace"))
    images = build_service_images()
    if LOCAL:
        images["redis"] = REDIS_IMAGE
        images["nginx"] = "herald-local/nginx:bookworm"
    tmp = tmp_path_factory.mktemp("pods")
    network = f"{PROJECT}-{uuid.uuid4().hex[:8]}"
    workloads = [doc for doc in of_kind(docs, "StatefulSet", "Deployment")]
    order = {"redis": 0, "publisher": 1, "edge": 2}
    workloads.sort(key=lambda doc: order.get(doc["metadata"]["name"], 3))
    started: dict[str, Pod] = {}
    docker("network", "create", "--label", f"{PROJECT}=1", network)
    try:
        for workload in workloads:
            pod = Pod(workload, docs, namespace, images, tmp)
            started[pod.name] = pod
            pod.start(network)
        yield started
    finally:
        for pod in started.values():
            pod.remove()
        docker("network", "rm", network, check=False)


@pytest.mark.timeout(600)
def test_every_probe_of_every_pod_passes_on_the_real_images(pods: dict[str, Pod]) -> None:
    assert set(pods) == {"redis", "publisher", "edge"}
    assert set(pods["edge"].containers) == {"nginx", "stream"}
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
        "GET /readyz on http: 200",  # the publisher
        "GET /healthz on http: 200",  # the publisher, nginx
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
