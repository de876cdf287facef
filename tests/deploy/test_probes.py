"""The rendered pods, run as Docker containers: do their probes hit what the
images serve?

The dev overlay's Redis, publisher, stream workers and nginx are started the
way their pod specs say: the same images (built locally from this checkout),
command and arguments, environment (ConfigMap, Secret, downward API), user,
read-only root filesystem, no capabilities, sysctls, memory limit, emptyDirs as
tmpfs and ConfigMap volumes as read-only files, and one network on which each
Service's name (short and <namespace>.svc.cluster.local) resolves to the pods
it selects, with the namespace's search domain, as in a cluster. Then every
probe is called as the kubelet would (HTTP: 200-399 passes; exec: exit 0), and
one event is published and read back through nginx, which finds the services
through the resolver and domain its entrypoint took from /etc/resolv.conf.

Bounded: about half a minute once the images are built.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from tests.deploy.manifests import of_kind, overlay
from tests.deploy.pods import LOCAL, PROJECT, Pod, build_service_images, docker
from tests.support.docker import REDIS_IMAGE, require_docker

READY_WITHIN = 90.0


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
    order = {"redis": 0, "publisher": 1, "stream": 1, "nginx": 2}
    workloads.sort(key=lambda doc: order.get(doc["metadata"]["name"], 3))
    started: dict[str, Pod] = {}
    docker("network", "create", "--label", f"{PROJECT}=1", network)
    try:
        for workload in workloads:
            pod = Pod(workload, docs, namespace, images, tmp)
            pod.start(network)
            started[pod.name] = pod
        yield started
    finally:
        for pod in started.values():
            docker("rm", "-f", "-v", pod.container_name, check=False)
        docker("network", "rm", network, check=False)


@pytest.mark.timeout(600)
def test_every_probe_of_every_pod_passes_on_the_real_images(pods: dict[str, Pod]) -> None:
    assert set(pods) == {"redis", "publisher", "stream", "nginx"}
    deadline = time.monotonic() + READY_WITHIN
    waiting = dict(pods)
    last: dict[str, str] = {}
    while waiting and time.monotonic() < deadline:
        for name, pod in list(waiting.items()):
            passed, last[name] = pod.probe("readinessProbe")
            if passed:
                del waiting[name]
        time.sleep(0.5)
    logs = "\n".join(pod.logs() for pod in waiting.values())
    assert not waiting, f"not ready within {READY_WITHIN} s: {last}\n{logs}"

    results = {}
    for name, pod in pods.items():
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            if kind in pod.container:
                results[f"{name} {kind}"] = pod.probe(kind)
    failed = {key: what for key, (passed, what) in results.items() if not passed}
    assert not failed, f"{failed}\n" + "\n".join(pod.logs() for pod in pods.values())
    # The probes asked for the paths the manifests name, and the services know them.
    http = {what for passed, what in results.values() if what.startswith("GET")}
    assert {"GET /readyz on http: 200", "GET /healthz on http: 200"} <= http, http


@pytest.mark.timeout(120)
def test_nginx_reaches_both_services_by_their_kubernetes_names(pods: dict[str, Pod]) -> None:
    nginx = pods["nginx"]
    base = f"http://127.0.0.1:{nginx.port('http')}"
    token = pods["publisher"].env["PUBLISH_TOKEN"]
    channel = f"k8s.{uuid.uuid4().hex[:8]}"
    answer = requests.post(
        f"{base}/publish",
        json={"channel": channel, "data": {"from": "kubernetes"}},
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
        timeout=10,
    )
    assert answer.status_code == 202, f"{answer.status_code} {answer.text}\n{nginx.logs()}"
    history = requests.get(f"{base}/history", params={"channel": channel}, timeout=10)
    assert history.status_code == 200, f"{history.status_code} {history.text}\n{nginx.logs()}"
    assert '"kubernetes"' in history.text, history.text
    rendered = docker("exec", nginx.container_name, "cat", "/etc/nginx/conf.d/herald.conf").stdout
    domain = f".{nginx.namespace}.svc.cluster.local:8000"
    assert f"stream-service{domain}" in rendered and f"publisher-service{domain}" in rendered
    assert "resolver 127.0.0.11" in rendered  # Docker's DNS here: the first nameserver of resolv.conf
