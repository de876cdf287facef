"""components/redis-cluster, run as Docker containers (see test_probes.py for
how a pod becomes a container): the Job forms the cluster from six empty
nodes, and after every node is recreated on a new address (what a restart of
all pods does on Kubernetes) the nodes find each other again by name, without
the Job, with their data. Then the webhook dispatcher, as the overlay renders
it (REDIS_MODE=cluster, the component's PARTITIONS) with webhooks on, takes
every lane of every partition over the cluster. Bounded: about a minute and
a half."""

from __future__ import annotations

import base64
import copy
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.deploy.manifests import named, of_kind, overlay, settings_map
from tests.deploy.pods import LOCAL, PROJECT, Pod, build_service_images, docker
from tests.support.docker import REDIS_IMAGE, require_docker

NODES = 6
KEYS = [f"herald-k8s-{i}" for i in range(20)]  # spread over the three masters' slots


def cluster_info(pod: Pod) -> dict[str, str]:
    done = docker("exec", pod.container_name, "redis-cli", "cluster", "info", check=False)
    pairs = (line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def peers(pod: Pod) -> set[tuple[str, str]]:
    """(address, link state) of every other node this one knows (CLUSTER NODES).
    A node's own entry may keep its former address: peers and clients never
    use it (the bus takes the connection's address, clients the hostname)."""
    done = docker("exec", pod.container_name, "redis-cli", "cluster", "nodes", check=False)
    fields = [line.split() for line in done.stdout.splitlines() if line]
    return {(f[1].split(":")[0], f[7]) for f in fields if "myself" not in f[2].split(",")}


def wait_until_ok(nodes: list[Pod], within: float) -> None:
    """Every node says ok and is connected to the five others at their
    current addresses. (cluster_state alone can stay `ok` on a node that
    reaches nobody, until it agrees with others that they failed.)"""
    deadline = time.monotonic() + within
    states: dict[str, tuple[str | None, set[tuple[str, str]]]] = {}
    while time.monotonic() < deadline:
        states = {pod.pod_name: (cluster_info(pod).get("cluster_state"), peers(pod)) for pod in nodes}
        if all(
            states[pod.pod_name] == ("ok", {(o.ip or "", "connected") for o in nodes if o is not pod})
            for pod in nodes
        ):
            return
        time.sleep(1)
    raise AssertionError(f"not ok within {within} s: {states}\n" + "\n".join(p.logs() for p in nodes))


@pytest.fixture
def network() -> Iterator[tuple[str, str]]:
    """A network with a subnet of its own, so that each node gets the address we choose."""
    require_docker("running the Redis Cluster pods")
    name = f"{PROJECT}-{uuid.uuid4().hex[:8]}"
    for _ in range(10):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        made = docker(
            "network", "create", "--label", f"{PROJECT}=1", "--subnet", f"{prefix}.0/24", name, check=False
        )
        if made.returncode == 0:
            break
    else:
        pytest.fail(f"could not create a Docker network: {made.stderr}")
    try:
        yield name, prefix
    finally:
        leftovers = docker("ps", "-aq", "--filter", f"network={name}", check=False).stdout.split()
        if leftovers:
            docker("rm", "-f", *leftovers, check=False)
        docker("network", "rm", name, check=False)


@pytest.mark.timeout(300)
def test_the_cluster_forms_and_comes_back_on_new_addresses(network: tuple[str, str], tmp_path: Path) -> None:
    name, prefix = network
    docs = overlay("redis-cluster")
    namespace = next(doc["metadata"]["name"] for doc in of_kind(docs, "Namespace"))
    statefulset = named(docs, "StatefulSet", "redis-cluster")
    assert statefulset["spec"]["replicas"] == NODES
    images = {"redis": REDIS_IMAGE} if LOCAL else {}

    def start_nodes(first_address: int) -> list[Pod]:
        nodes = []
        for ordinal in range(NODES):
            ip = f"{prefix}.{first_address + ordinal}"
            pod = Pod(statefulset, docs, namespace, images, tmp_path, replica=ordinal, ip=ip)
            pod.start(name)
            nodes.append(pod)
        return nodes

    nodes = start_nodes(10)
    job = Pod(named(docs, "Job", "redis-cluster-init"), docs, namespace, images, tmp_path)
    job.start(name)
    waited = docker("wait", job.container_name, timeout=240)
    assert waited.stdout.strip() == "0", job.logs() + "\n".join(p.logs() for p in nodes)
    wait_until_ok(nodes, within=60)
    for key in KEYS:
        docker("exec", nodes[0].container_name, "redis-cli", "-c", "set", key, f"value-{key}")

    # Every pod recreated at once, each on another address: nodes.conf names
    # the old ones. No Job this time: the nodes must meet again by themselves.
    docker("rm", "-f", *(pod.container_name for pod in nodes))
    nodes = start_nodes(100)
    wait_until_ok(nodes, within=120)
    for key in KEYS:
        got = docker("exec", nodes[3].container_name, "redis-cli", "-c", "get", key).stdout.strip()
        assert got == f"value-{key}", key

    # The Job again (every `kubectl apply -k` runs it): a formed cluster is left as it is.
    docker("rm", "-f", job.container_name)
    job.start(name)
    waited = docker("wait", job.container_name, timeout=240)
    assert waited.stdout.strip() == "0", job.logs()
    wait_until_ok(nodes, within=30)

    # The webhook dispatcher on this cluster, with webhooks on as an operator
    # turns them on: WEBHOOK_URL and WEBHOOKS=true in herald-settings, the
    # signing secret in the Secret they create. No stream runs, so nothing is
    # sent (the receiver need not exist): it must hold all 8 x PARTITIONS lanes,
    # their leases spread over the masters' slots.
    hooks = copy.deepcopy(docs)
    settings = settings_map(hooks)["data"]
    assert settings["REDIS_MODE"] == "cluster"
    settings.update(WEBHOOK_URL="http://webhook-receiver.invalid/hooks", WEBHOOKS="true")
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    hooks.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "herald-secrets", "namespace": namespace},
            "data": {"WEBHOOK_SECRET": base64.b64encode(secret.encode()).decode()},
        }
    )
    images = {**images, **build_service_images()}
    dispatcher = Pod(named(hooks, "Deployment", "webhook-dispatcher"), hooks, namespace, images, tmp_path)
    dispatcher.start(name)
    lanes = 8 * int(settings["PARTITIONS"])
    ready: dict[str, object] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ready = requests.get(f"http://127.0.0.1:{dispatcher.port('http')}/readyz", timeout=5).json()
        except requests.RequestException as error:
            ready = {"error": repr(error)}
        if ready.get("lanes") == lanes:
            break
        time.sleep(1)
    assert ready == {"status": "ok", "webhooks": "on", "lanes": lanes}, f"{ready}\n{dispatcher.logs()}"
