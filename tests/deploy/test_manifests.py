"""deploy/kubernetes, checked with no cluster (issue 19).

Every overlay renders with `kubectl kustomize` and validates, strictly (no
unknown field), against the Kubernetes schemas of every version
kubernetes-validate bundles (1.25 to 1.37 with the pinned release). Then what
schemas cannot see: selectors match pods, Services reach ports that exist,
probes and resources everywhere, grace above the drain, pinned images, and
settings that .env.example documents, the edge pod's socket between nginx
and its stream worker, and the webhook dispatcher (its settings, secret and
network policy). tests/deploy/test_probes.py runs the images with the rendered
pods' settings, calls their probes, streams through the socket and has the
dispatcher send webhooks.
"""

from __future__ import annotations

import ast
import base64
import copy
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dispatcher.config import Config as DispatcherConfig
from kubernetes_validate import utils as kubernetes_validate
from stream import slots

from tests.deploy.manifests import (
    EXTERNAL_SECRET,
    KUBERNETES,
    OVERLAYS,
    ROOT,
    Doc,
    documented_settings,
    named,
    of_kind,
    overlay,
    pod_templates,
    render,
    selects,
    settings_map,
)

# Versions the manifests are claimed to work on: every one the validator
# bundles (autoscaling/v2, policy/v1 and the sysctl nginx uses are all older).
VERSIONS = sorted(set(kubernetes_validate.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
# Custom resources: no schema in Kubernetes' own; checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Environment variables set on containers that are not settings of .env.example,
# and who reads them.
NOT_SETTINGS = {
    # gunicorn's worker count, from PUBLISHER_WEB_CONCURRENCY / STREAM_WEB_CONCURRENCY (as compose.yaml).
    "WEB_CONCURRENCY": None,
    # nginx/entrypoint.sh: the cluster's DNS server and namespace domain.
    "NGINX_RESOLVER": ROOT / "nginx" / "entrypoint.sh",
    "NGINX_SERVICE_DOMAIN": ROOT / "nginx" / "entrypoint.sh",
    # stream-service/gunicorn.conf.py: the directory of the socket nginx connects to.
    "STREAM_SOCKET_DIR": ROOT / "stream-service" / "gunicorn.conf.py",
    # The webhook dispatcher's port (probes, /metrics), fixed as in compose.yaml.
    "DISPATCHER_PORT": ROOT / "publisher-service" / "dispatcher" / "config.py",
    # components/redis-cluster/node.sh: the pod's own name, namespace and address.
    "POD_NAME": KUBERNETES / "components" / "redis-cluster" / "node.sh",
    "POD_NAMESPACE": KUBERNETES / "components" / "redis-cluster" / "node.sh",
    "POD_IP": KUBERNETES / "components" / "redis-cluster" / "node.sh",
}
# Keys of herald-settings that .env.example does not list, because Compose
# derives them from another setting, which they must agree with (checked below).
DERIVED = {"WEBHOOKS": "WEBHOOK_URL"}
# What only the Secret may hold.
SECRETS = {"PUBLISH_TOKEN", "SUBSCRIBE_SECRET", "WEBHOOK_SECRET"}
DISPATCHER = "webhook-dispatcher"
# docs/capacity.md, "Memory per stream": the most each stream was measured to take.
STREAM_WORKER_BYTES_PER_STREAM = 4.1e3
NGINX_BYTES_PER_STREAM = 13.7e3
MI = 2**20
NGINX_ENTRYPOINT = ROOT / "nginx" / "entrypoint.sh"


def socket_dir() -> str:
    """Where nginx looks for the stream workers' sockets: nginx/entrypoint.sh lists
    <dir>/stream-<n>.sock, and stream/slots.py binds the same names in STREAM_SOCKET_DIR."""
    found = re.search(r"server unix:(/[^ ]+)/stream-\$n\.sock", NGINX_ENTRYPOINT.read_text())
    assert found, "nginx/entrypoint.sh no longer lists unix:<dir>/stream-$n.sock"
    return found.group(1)


def test_there_are_the_overlays_issue_19_asks_for() -> None:
    assert {"dev", "single-redis", "redis-cluster"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_validates_against_every_supported_kubernetes(name: str) -> None:
    docs = overlay(name)
    assert docs, f"overlays/{name} renders nothing"
    failures = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(str(part) for part in error.path)
                failures.append(
                    f"{version} {doc['kind']}/{doc['metadata']['name']} at {where}: {error.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as error:
                failures.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert not failures, "\n".join(failures[:20])


def test_the_base_and_each_component_render() -> None:
    render(KUBERNETES / "base")
    for component in sorted((KUBERNETES / "components").iterdir()):
        text = (component / "kustomization.yaml").read_text()
        assert "kind: Component" in text, component


def test_the_service_monitor_is_well_formed() -> None:
    docs = overlay("full-example")
    monitor = named(docs, "ServiceMonitor", "herald")
    endpoints = monitor["spec"]["endpoints"]
    assert [e["path"] for e in endpoints] == ["/metrics"]
    services = [s for s in of_kind(docs, "Service") if selects(monitor["spec"]["selector"], labels_of(s))]
    assert {s["metadata"]["name"] for s in services} == {
        "publisher-service",
        "stream-metrics",
        "webhook-dispatcher-metrics",
    }
    # Each scraped port is the TCP 8000 of the container that serves /metrics:
    # the publisher's, in the edge pods the stream worker's (never nginx's),
    # and the webhook dispatcher's.
    serving = {
        "publisher-service": "publisher",
        "stream-metrics": "stream",
        "webhook-dispatcher-metrics": "dispatcher",
    }
    for service in services:
        ports = {p.get("name"): p for p in service["spec"]["ports"]}
        assert endpoints[0]["port"] in ports, service["metadata"]["name"]
        target = ports[endpoints[0]["port"]].get("targetPort")
        for workload, template in pod_templates(docs):
            if workload["kind"] == "Job" or not selects(service["spec"]["selector"], labels_of(template)):
                continue
            reached = [
                (c["name"], p["containerPort"])
                for c in containers(template)
                for p in c.get("ports", [])
                if target in (p.get("name"), p["containerPort"])
            ]
            assert reached == [(serving[service["metadata"]["name"]], 8000)], (
                service["metadata"]["name"],
                reached,
            )


def labels_of(doc: Doc) -> dict[str, str]:
    return dict(doc["metadata"].get("labels") or {})


def containers(template: Doc) -> list[Doc]:
    return list(template["spec"].get("initContainers", [])) + list(template["spec"]["containers"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_selectors_match_their_pods(name: str) -> None:
    docs = overlay(name)
    templates = pod_templates(docs)
    pods = [labels_of(template) for _, template in templates]
    for workload, template in templates:
        if workload["kind"] != "Job":
            assert selects(workload["spec"]["selector"], labels_of(template)), workload["metadata"]["name"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in of_kind(docs, kind):
            key = "podSelector" if kind == "NetworkPolicy" else "selector"
            assert any(selects(doc["spec"][key], pod) for pod in pods), f"{kind}/{doc['metadata']['name']}"
    for policy in of_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(selects(peer["podSelector"], pod) for pod in pods), policy["metadata"]["name"]
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        named(docs, target["kind"], target["name"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_select_pods_and_ports_that_exist(name: str) -> None:
    docs = overlay(name)
    templates = pod_templates(docs)
    for service in of_kind(docs, "Service"):
        matched = [
            t
            for w, t in templates
            if w["kind"] != "Job" and selects(service["spec"]["selector"], labels_of(t))
        ]
        assert matched, f"Service/{service['metadata']['name']} selects no pod"
        for template in matched:
            # A named port must be unique within the pod (the API refuses it otherwise).
            names = [p["name"] for c in containers(template) for p in c.get("ports", []) if "name" in p]
            assert len(names) == len(set(names)), f"port names repeat in a pod: {names}"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for template in matched:
                offered = [p for c in containers(template) for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in offered), (
                    f"Service/{service['metadata']['name']} port {target} is not a port of its pods"
                )


def probe_port(container: Doc, port: Any) -> int:
    for offered in container.get("ports", []):
        if port in (offered.get("name"), offered["containerPort"]):
            return int(offered["containerPort"])
    raise AssertionError(f"probe port {port} is not a port of container {container['name']}")


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_has_probes_resources_and_least_privilege(name: str) -> None:
    for workload, template in pod_templates(overlay(name)):
        spec = template["spec"]
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, workload["metadata"]["name"]
        for container in containers(template):
            where = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            if workload["kind"] != "Job":  # a run-to-completion pod is never behind a Service
                for probe in ("readinessProbe", "livenessProbe"):
                    assert probe in container, f"{where} has no {probe}"
                for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if "httpGet" in container.get(kind, {}):
                        probe_port(container, container[kind]["httpGet"]["port"])
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where
            assert not security.get("privileged"), where


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def prestop_seconds(container: Doc) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


@pytest.mark.parametrize("name", OVERLAYS)
def test_rolling_updates_never_drop_capacity_and_grace_outlasts_the_drain(name: str) -> None:
    docs = overlay(name)
    settings = settings_map(docs)["data"]
    drain = float(settings["GRACEFUL_TIMEOUT"])
    for deployment in of_kind(docs, "Deployment"):
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        grace = spec["terminationGracePeriodSeconds"]
        if deployment["metadata"]["name"] == DISPATCHER:
            # No Service sends it requests: no preStop (it would only hold the
            # lanes longer). On SIGTERM a POST in flight ends (the timeout) and
            # the lanes are released; any not released by WEBHOOK_LEASE_SECONDS
            # have lapsed, with nothing in flight: a kill after that is harmless.
            assert [prestop_seconds(c) for c in spec["containers"]] == [0.0]
            timeout = float(settings["WEBHOOK_TIMEOUT_SECONDS"])
            lease = float(settings["WEBHOOK_LEASE_SECONDS"])
            assert grace > timeout + 1, f"{DISPATCHER}: grace {grace} s <= WEBHOOK_TIMEOUT_SECONDS + 1"
            assert grace > lease, f"{DISPATCHER}: grace {grace} s <= WEBHOOK_LEASE_SECONDS {lease}"
            continue
        for container in spec["containers"]:
            wait = prestop_seconds(container)
            assert wait >= seconds(settings["DNS_VALID"]), (
                f"{container['name']}: preStop shorter than DNS_VALID"
            )
            # gunicorn drains after the preStop sleep, for GRACEFUL_TIMEOUT at most.
            needed = wait + (drain if container["name"] in {"publisher", "stream"} else 0)
            assert grace > needed, f"{container['name']}: grace {grace} s <= preStop + drain {needed} s"
        by_name = {c["name"]: c for c in spec["containers"]}
        if {"nginx", "stream"} <= set(by_name):
            # The stream worker ends its streams after its preStop; nginx, in
            # the same pod, must still run then to pass their clean ends on.
            assert prestop_seconds(by_name["nginx"]) > prestop_seconds(by_name["stream"]), (
                "nginx's preStop must outlast the stream worker's"
            )
    for workload in of_kind(docs, "Deployment"):
        assert any(
            selects(pdb["spec"]["selector"], labels_of(workload["spec"]["template"]))
            for pdb in of_kind(docs, "PodDisruptionBudget")
        ), f"no PodDisruptionBudget for {workload['metadata']['name']}"
    hpa = named(docs, "HorizontalPodAutoscaler", "edge")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "edge"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_are_pinned(name: str) -> None:
    for workload, template in pod_templates(overlay(name)):
        for container in containers(template):
            image = container["image"]
            last = image.rsplit("/", 1)[-1]
            assert "@sha256:" in image or ":" in last, f"{workload['metadata']['name']}: {image} has no tag"
            assert not image.endswith(":latest"), f"{workload['metadata']['name']}: {image}"


def env_names(container: Doc) -> set[str]:
    return {entry["name"] for entry in container.get("env", [])}


@pytest.mark.parametrize("name", OVERLAYS)
def test_settings_are_documented_and_references_resolve(name: str) -> None:
    docs = overlay(name)
    documented = documented_settings()
    settings = settings_map(docs)
    undocumented = set(settings["data"]) - documented - set(DERIVED)
    assert not undocumented, f"herald-settings keys not in .env.example: {sorted(undocumented)}"
    assert set(DERIVED.values()) <= documented
    assert not SECRETS & set(settings["data"]), "secrets belong in the Secret"
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")}
    secrets = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "Secret")}
    for workload, template in pod_templates(docs):
        for container in containers(template):
            where = f"{workload['metadata']['name']}/{container['name']}"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, where
            for entry in container.get("env", []):
                if entry["name"] not in documented:
                    assert entry["name"] in NOT_SETTINGS, f"{where}: {entry['name']} is no documented setting"
                    reader = NOT_SETTINGS[entry["name"]]
                    assert reader is None or entry["name"] in reader.read_text(), entry["name"]
                ref = entry.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config_maps[ref["configMapKeyRef"]["name"]], where
                if "secretKeyRef" in ref:
                    secret = ref["secretKeyRef"]["name"]
                    if secret in secrets:
                        assert ref["secretKeyRef"]["key"] in secrets[secret], where
                    else:
                        assert secret == EXTERNAL_SECRET, (
                            f"{where}: Secret {secret} is neither rendered nor documented"
                        )
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                data = config_maps[volume["configMap"]["name"]]
                for item in volume["configMap"].get("items", []):
                    assert item["key"] in data, volume["name"]
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claims, f"no volume {mount['name']}"
                volume = volumes.get(mount["name"], {})
                if "subPath" in mount and "configMap" in volume:
                    assert mount["subPath"] in config_maps[volume["configMap"]["name"]], mount


def test_the_dev_overlay_brings_its_own_secret() -> None:
    secret = named(
        overlay("dev"), "Secret", next(doc["metadata"]["name"] for doc in of_kind(overlay("dev"), "Secret"))
    )
    assert set(secret["data"]) >= SECRETS
    # A WEBHOOK_SECRET the dispatcher takes, once a WEBHOOK_URL is set.
    webhook_secret = base64.b64decode(secret["data"]["WEBHOOK_SECRET"]).decode()
    config = DispatcherConfig.from_env(
        {"WEBHOOK_URL": "https://example.com/", "WEBHOOK_SECRET": webhook_secret}
    )
    assert len(config.secrets) == 1


@pytest.mark.parametrize("name", OVERLAYS)
def test_sizes_follow_the_settings(name: str) -> None:
    """Front-door arithmetic of .env.example, and memory from docs/capacity.md."""
    docs = overlay(name)
    settings = settings_map(docs)["data"]
    assert int(settings["NGINX_WORKER_CONNECTIONS"]) >= 2 * int(settings["NGINX_MAX_STREAMS"]) + 512
    assert int(settings["NGINX_NOFILE"]) >= int(settings["NGINX_WORKER_CONNECTIONS"])

    def limit(container: str) -> float:
        value = container_of(named(docs, "Deployment", "edge"), container)["resources"]["limits"]["memory"]
        match = re.fullmatch(r"(\d+)(Mi|Gi)", value)
        assert match, value
        return int(match.group(1)) * (MI if match.group(2) == "Mi" else 1024 * MI)

    streams = int(settings["MAX_CONNECTIONS"]) * int(settings["STREAM_WEB_CONCURRENCY"])
    assert limit("stream") >= streams * STREAM_WORKER_BYTES_PER_STREAM + 64 * MI
    assert limit("nginx") >= int(settings["NGINX_MAX_STREAMS"]) * NGINX_BYTES_PER_STREAM + 32 * MI
    # One stream worker behind each nginx: the streams it can hold get through.
    assert int(settings["NGINX_MAX_STREAMS"]) >= streams


# The overlays that run a Redis of their own (not an external cluster by URL).
WITH_REDIS = [name for name in OVERLAYS if name != "external-redis-cluster"]


@pytest.mark.parametrize("name", WITH_REDIS)
def test_only_the_services_reach_redis(name: str) -> None:
    docs = overlay(name)
    redis_pods = [
        labels_of(t)
        for w, t in pod_templates(docs)
        if labels_of(t).get("app.kubernetes.io/component") == "redis"
    ]
    assert redis_pods, f"overlays/{name} runs no Redis"
    policies = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], redis_pods[0])]
    assert policies, "no NetworkPolicy covers Redis"
    # The edge pods for their stream worker (a policy cannot tell nginx from it).
    allowed = {"publisher", "edge", DISPATCHER, "redis", "redis-cluster-init"}
    # Every service reaches Redis' port: the webhook dispatcher as the others.
    for component in ("publisher", "edge", DISPATCHER):
        labels = labels_of(named(docs, "Deployment", component)["spec"]["template"])
        assert any(
            any(p.get("port") in (6379, "redis") for p in rule.get("ports", []))
            and any("podSelector" in peer and selects(peer["podSelector"], labels) for peer in rule["from"])
            for policy in policies
            for rule in policy["spec"].get("ingress", [])
        ), f"no NetworkPolicy lets the {component} pods reach Redis"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` lets everyone in"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer
                reached = {
                    labels_of(t).get("app.kubernetes.io/component")
                    for _, t in pod_templates(docs)
                    if selects(peer["podSelector"], labels_of(t))
                }
                assert reached <= allowed, reached


def test_the_nginx_files_are_the_ones_compose_mounts() -> None:
    """deploy/kubernetes/base/nginx is a copy (kustomize reads nothing outside
    its directory): it must not drift. Fix with deploy/kubernetes/base/sync-nginx.sh."""
    copy = KUBERNETES / "base" / "nginx"
    original = ROOT / "nginx"
    copied = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert copied, "deploy/kubernetes/base/nginx is empty: run deploy/kubernetes/base/sync-nginx.sh"
    expected = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    assert copied == expected, "run deploy/kubernetes/base/sync-nginx.sh"
    stale = [str(p) for p in copied if (copy / p).read_bytes() != (original / p).read_bytes()]
    assert not stale, f"differ from nginx/: {stale}; run deploy/kubernetes/base/sync-nginx.sh"


def test_herald_js_is_the_one_in_clients_js() -> None:
    """The ConfigMap's herald.js is a copy of clients/js/herald.js (what nginx
    serves at /herald.js): it must not drift. Fix with deploy/kubernetes/base/sync-nginx.sh."""
    copy = KUBERNETES / "base" / "clients" / "js" / "herald.js"
    original = ROOT / "clients" / "js" / "herald.js"
    assert copy.read_bytes() == original.read_bytes(), "run deploy/kubernetes/base/sync-nginx.sh"


def test_the_ingress_example_does_not_buffer_streams() -> None:
    ingress = named(overlay("full-example"), "Ingress", "herald")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    heartbeat = float(settings_map(overlay("full-example"))["data"]["HEARTBEAT_SECONDS"])
    assert float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 2 * heartbeat


def container_of(workload: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: {len(found)} containers named {name}"
    return found[0]


def container_env(docs: list[Doc], deployment: str, container: str) -> set[str]:
    spec = container_of(named(docs, "Deployment", deployment), container)
    names = {entry["name"] for entry in spec.get("env", [])}
    for source in spec.get("envFrom", []):
        names |= set(named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    return names


def plain_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """A container's environment as Kubernetes makes it: envFrom, then `env` on
    top (plain values only; references are checked elsewhere)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_setting_a_container_reads_is_given_to_it(name: str) -> None:
    """As tests/unit/test_settings_documented.py does for compose.yaml."""
    docs = overlay(name)
    for deployment, container, config in (
        ("publisher", "publisher", "publisher-service/publisher/config.py"),
        ("edge", "stream", "stream-service/stream/config.py"),
        (DISPATCHER, "dispatcher", "publisher-service/dispatcher/config.py"),
    ):
        read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', (ROOT / config).read_text()))
        missing = read - container_env(docs, deployment, container)
        assert not missing, f"{config} reads {sorted(missing)}, which the {container} containers never get"
    missing = dispatcher_reads() - container_env(docs, DISPATCHER, "dispatcher")
    assert not missing, f"the dispatcher reads {sorted(missing)}, which its containers never get"
    # gunicorn.conf.py: the socket nginx reaches the stream worker by.
    missing = {"STREAM_SOCKET_DIR", "STREAM_SLOTS"} - container_env(docs, "edge", "stream")
    assert not missing, f"the stream containers never get {sorted(missing)}"
    templates = "\n".join(
        line
        for path in (ROOT / "nginx" / "templates").glob("*.template")
        for line in path.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", templates)) - {
        # Made by nginx/entrypoint.sh from the settings below.
        "HERALD_REAL_IP",
        "HERALD_CORS_ORIGINS",
        "HERALD_RESOLVER",
        "HERALD_SERVICE_DOMAIN",
        "HERALD_STREAM_SERVERS",
        "HERALD_STREAM_TARGET",
        "HERALD_TLS_DIR",
        "HERALD_TLS_LISTEN",
        "HERALD_TLS_REDIRECT",
        "HERALD_HSTS",
    }
    read |= {
        "REAL_IP_FROM",
        "CORS_ALLOWED_ORIGINS",
        "NGINX_RESOLVER",
        "NGINX_SERVICE_DOMAIN",
        "STREAM_SLOTS",
        "STREAM_TRANSPORT",
    }
    missing = read - container_env(docs, "edge", "nginx")
    assert not missing, f"nginx reads {sorted(missing)}, which the nginx containers never get"


def dispatcher_reads() -> set[str]:
    """Every setting the webhook dispatcher reads: the names dispatcher/config.py
    quotes, those that the helpers it imports from publisher/config.py quote
    (REDIS_MODE, PARTITIONS), and what its modules take from os.environ (LOG_LEVEL)."""
    package = ROOT / "publisher-service" / "dispatcher"
    config = (package / "config.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', config))
    helpers = {
        alias.name
        for node in ast.walk(ast.parse(config))
        if isinstance(node, ast.ImportFrom) and node.module == "publisher.config"
        for alias in node.names
    }
    assert helpers, "dispatcher/config.py no longer parses by publisher/config.py's rules"
    publisher_config = ast.parse((ROOT / "publisher-service" / "publisher" / "config.py").read_text())
    for function in ast.walk(publisher_config):
        if isinstance(function, ast.FunctionDef) and function.name in helpers:
            read |= {
                node.value
                for node in ast.walk(function)
                if isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[A-Z][A-Z0-9_]+", node.value)
            }
    for module in package.glob("*.py"):
        read |= set(re.findall(r'os\.environ\.get\("([A-Z][A-Z0-9_]+)"', module.read_text()))
    assert {"REDIS_URL", "REDIS_MODE", "PARTITIONS", "WEBHOOK_URL", "LOG_LEVEL"} <= read, read
    return read


FAKE_IMAGE_ENTRYPOINT = """#!/bin/sh
printf '%s\\n' "$HERALD_STREAM_TARGET" "$HERALD_STREAM_SERVERS"
"""


def nginx_stream_upstream(env: dict[str, str], tmp_path: Path) -> tuple[str, list[str]]:
    """What nginx/entrypoint.sh makes of a container's environment: the stream
    target and the sockets of the upstream herald_streams (no nginx needed)."""
    if shutil.which("sed") is None or shutil.which("mkfifo") is None:
        pytest.skip("needs sed and mkfifo")
    fake = tmp_path / "docker-entrypoint.sh"
    fake.write_text(FAKE_IMAGE_ENTRYPOINT)
    fake.chmod(0o755)
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("search herald.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n")
    done = subprocess.run(
        ["sh", str(NGINX_ENTRYPOINT)],
        env={
            **env,
            "PATH": "/usr/bin:/bin",
            "HERALD_IMAGE_ENTRYPOINT": str(fake),
            "HERALD_RESOLV_CONF": str(resolv_conf),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    target, servers = done.stdout.splitlines()
    return target, re.findall(r"server unix:(\S+) ", servers)


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_edge_pod_wires_nginx_to_its_stream_worker_over_a_socket(name: str, tmp_path: Path) -> None:
    """nginx and one stream worker share a pod and reach each other over the
    Unix socket of an in-memory emptyDir (issue 17): the same directory in both,
    the same slots, the unix transport, and a group both belong to."""
    docs = overlay(name)
    edge = named(docs, "Deployment", "edge")
    spec = edge["spec"]["template"]["spec"]
    assert sorted(c["name"] for c in spec["containers"]) == ["nginx", "stream"]
    nginx, stream = container_of(edge, "nginx"), container_of(edge, "stream")
    # The edge pod is the one place nginx and the stream service run: no
    # separate Deployment of either (their tcp hop is gone on Kubernetes).
    images = {nginx["image"].rsplit(":", 1)[0], stream["image"].rsplit(":", 1)[0]}
    for workload, template in pod_templates(docs):
        if workload is not edge:
            for other in containers(template):
                assert other["image"].rsplit(":", 1)[0] not in images, workload["metadata"]["name"]

    # The pod's shape, set on the containers themselves (herald-settings cannot change it).
    for container, keys in (
        (nginx, {"STREAM_TRANSPORT", "STREAM_SLOTS"}),
        (stream, {"STREAM_SOCKET_DIR", "STREAM_SLOTS"}),
    ):
        assert keys <= {e["name"] for e in container.get("env", []) if "value" in e}, container["name"]
    nginx_env, stream_env = plain_env(docs, nginx), plain_env(docs, stream)
    assert nginx_env["STREAM_TRANSPORT"] == "unix"
    # One stream worker per pod, one slot: nginx tries no socket nobody serves.
    assert nginx_env["STREAM_SLOTS"] == stream_env["STREAM_SLOTS"] == "1"
    assert stream_env["STREAM_SOCKET_DIR"] == socket_dir()

    # nginx's upstream is exactly the sockets the stream worker may bind.
    target, sockets = nginx_stream_upstream(nginx_env, tmp_path)
    assert target == "herald_streams", target
    count = slots.parse_slots(stream_env["STREAM_SLOTS"])
    assert sockets == [slots.socket_path(stream_env["STREAM_SOCKET_DIR"], n) for n in range(1, count + 1)]

    # One in-memory emptyDir at that directory in both containers, writable
    # by the stream worker; nginx only connects (read-only is enough).
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {
        c["name"]: [m for m in c.get("volumeMounts", []) if m["mountPath"] == socket_dir()]
        for c in (nginx, stream)
    }
    assert len(mounts["nginx"]) == len(mounts["stream"]) == 1, mounts
    assert mounts["nginx"][0]["name"] == mounts["stream"][0]["name"], mounts
    assert not mounts["stream"][0].get("readOnly"), "the stream worker creates its socket there"
    assert "subPath" not in mounts["nginx"][0] and "subPath" not in mounts["stream"][0]
    shared = volumes[mounts["stream"][0]["name"]]
    assert set(shared) == {"name", "emptyDir"}, shared
    assert shared["emptyDir"].get("medium") == "Memory", shared

    # nginx (101) and the stream worker (10001) are different users: the pod's
    # fsGroup makes the directory theirs by group (docs/kubernetes.md).
    pod_security = spec.get("securityContext", {})
    users = {
        c["name"]: c.get("securityContext", {}).get("runAsUser", pod_security.get("runAsUser"))
        for c in (nginx, stream)
    }
    assert users["nginx"] != users["stream"], users
    assert pod_security.get("fsGroup") not in (None, 0), "no shared group for the socket directory"


@pytest.mark.parametrize("name", OVERLAYS)
def test_over_the_network_only_nginx_takes_requests(name: str) -> None:
    """nginx reaches its stream worker inside the pod: the edge pods take port 80
    only (plus Prometheus from its namespace, with the ServiceMonitor), and the
    publisher takes requests from the edge pods only."""
    docs = overlay(name)
    templates = pod_templates(docs)

    def components(selector: Doc) -> set[str]:
        return {
            labels_of(t).get("app.kubernetes.io/component", "")
            for _, t in templates
            if selects(selector, labels_of(t))
        }

    for component, open_ports in (("edge", {80, "http"}), ("publisher", set())):
        labels = labels_of(named(docs, "Deployment", component)["spec"]["template"])
        policies = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
        assert policies, f"no NetworkPolicy isolates the {component} pods"
        for policy in policies:
            where = f"NetworkPolicy/{policy['metadata']['name']}"
            assert "Ingress" in policy["spec"]["policyTypes"], where
            for rule in policy["spec"].get("ingress", []):
                ports = {p.get("port") for p in rule.get("ports", [])}
                assert ports, f"{where}: a rule without ports opens every port of the {component} pods"
                if ports <= open_ports:
                    continue
                assert rule.get("from"), f"{where}: {sorted(map(str, ports))} open to everyone"
                for peer in rule["from"]:
                    if set(peer) == {"namespaceSelector"}:
                        continue  # Prometheus, from its own namespace
                    assert set(peer) == {"podSelector"}, f"{where}: {peer}"
                    assert component == "publisher", f"{where}: pods reach the stream worker's {ports}"
                    assert components(peer["podSelector"]) == {"edge"}, where


def env_example_defaults() -> dict[str, str]:
    """.env.example's values (KEY=value lines)."""
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))


def test_the_webhook_settings_are_env_examples_defaults() -> None:
    """base/settings.env: every WEBHOOK_* setting (but the secret) at .env.example's
    default, so webhooks are off (no URL) and WEBHOOKS says so."""
    settings = settings_map(render(KUBERNETES / "base"))["data"]
    defaults = env_example_defaults()
    webhook = {key for key in defaults if key.startswith("WEBHOOK_")} - SECRETS
    assert webhook, ".env.example lists no WEBHOOK_* settings"
    assert {key: settings.get(key) for key in webhook} == {key: defaults[key] for key in webhook}
    assert settings["WEBHOOK_URL"] == "" and settings["WEBHOOKS"] == "false"


def base_replicas(name: str) -> int:
    return int(named(render(KUBERNETES / "base"), "Deployment", name)["spec"]["replicas"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_webhook_dispatcher_runs_beside_the_services(name: str) -> None:
    """compose.yaml's webhook-dispatcher: the publisher's image with its own
    command, the same settings, its secret from the Secret, its port and probes."""
    docs = overlay(name)
    dispatcher = named(docs, "Deployment", DISPATCHER)
    publisher = container_of(named(docs, "Deployment", "publisher"), "publisher")
    stream = container_of(named(docs, "Deployment", "edge"), "stream")
    spec = dispatcher["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["dispatcher"]
    container = container_of(dispatcher, "dispatcher")
    # Two that share the lanes (one takes over a dead one's); dev runs one of each.
    assert base_replicas(DISPATCHER) == 2
    if name != "dev":
        assert dispatcher["spec"]["replicas"] == 2
    assert container["image"] == publisher["image"], "the dispatcher runs the publisher's image"
    assert container["command"] == ["python", "-m", "dispatcher"]
    assert "args" not in container

    # The same settings as the other services, and its secret as theirs: from the Secret.
    assert container["envFrom"] == publisher["envFrom"] == stream["envFrom"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    token = next(e for e in publisher["env"] if e["name"] == "PUBLISH_TOKEN")["valueFrom"]["secretKeyRef"]
    assert refs == {"WEBHOOK_SECRET": {"name": token["name"], "key": "WEBHOOK_SECRET"}}, refs
    env = plain_env(docs, container)
    publisher_env, stream_env = plain_env(docs, publisher), plain_env(docs, stream)
    for key in ("REDIS_URL", "REDIS_MODE", "PARTITIONS", "REDIS_TIMEOUT_SECONDS"):
        assert env[key] == publisher_env[key] == stream_env[key], key
    # Both ends of the vacated delay read the same value.
    assert env["WEBHOOK_VACATED_DELAY_SECONDS"] == stream_env["WEBHOOK_VACATED_DELAY_SECONDS"]
    if name in ("redis-cluster", "external-redis-cluster"):
        assert env["REDIS_MODE"] == "cluster"
        assert int(env["PARTITIONS"]) > 1
    # The settings as the dispatcher parses them (webhooks off here: no URL, no secret needed).
    config = DispatcherConfig.from_env(env)
    assert config.partitions == int(publisher_env["PARTITIONS"])

    # Its port: /healthz, /readyz and /metrics on 8000, fixed on the container.
    assert {e["name"]: e.get("value") for e in container["env"]}["DISPATCHER_PORT"] == "8000"
    assert config.port == 8000
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[kind]["httpGet"]
        assert get["path"] == path and probe_port(container, get["port"]) == 8000, kind

    # As the other pods: non-root (the publisher's user), read-only, /tmp in memory.
    pod_security = spec["securityContext"]
    publisher_security = named(docs, "Deployment", "publisher")["spec"]["template"]["spec"]["securityContext"]
    assert pod_security == publisher_security
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and volumes[tmp[0]["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", OVERLAYS)
def test_webhooks_is_set_with_webhook_url(name: str) -> None:
    """Compose derives WEBHOOKS from WEBHOOK_URL; kustomize cannot, so
    herald-settings holds both, and they must agree: with a URL and WEBHOOKS
    off no event is ever written, with WEBHOOKS on and no URL none is sent."""
    docs = overlay(name)
    for key, source in DERIVED.items():
        assert key in settings_map(docs)["data"], key
        for deployment, container in (
            ("publisher", "publisher"),
            ("edge", "stream"),
            (DISPATCHER, "dispatcher"),
        ):
            env = plain_env(docs, container_of(named(docs, "Deployment", deployment), container))
            expected = "true" if env[source].strip() else "false"
            assert env[key] == expected, (
                f"{deployment}/{container}: {key}={env[key]!r} with {source}={env[source]!r}"
            )


def policies_of(docs: list[Doc], component: str) -> list[Doc]:
    labels = labels_of(named(docs, "Deployment", component)["spec"]["template"])
    return [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def egress_ports(docs: list[Doc], component: str) -> set[tuple[str, Any]]:
    return {
        (port.get("protocol", "TCP"), port.get("port"))
        for policy in policies_of(docs, component)
        for rule in policy["spec"].get("egress", [])
        for port in rule.get("ports", [])
    }


@pytest.mark.parametrize("name", OVERLAYS)
def test_nothing_connects_to_the_webhook_dispatcher_and_it_goes_out_only_where_it_must(name: str) -> None:
    """Ingress: Prometheus' namespace on 8000 (with the ServiceMonitor), nothing
    else. Egress: DNS, Redis and the receivers (80/443), each rule with ports."""
    docs = overlay(name)
    policies = policies_of(docs, DISPATCHER)
    assert policies, "no NetworkPolicy isolates the webhook dispatcher"
    assert any("Ingress" in p["spec"]["policyTypes"] for p in policies), "its ingress is open"
    assert any("Egress" in p["spec"]["policyTypes"] for p in policies), "its egress is open"
    scraped = False
    for policy in policies:
        where = f"NetworkPolicy/{policy['metadata']['name']}"
        for rule in policy["spec"].get("ingress", []):
            assert {p.get("port") for p in rule.get("ports", [])} == {8000}, where
            assert rule.get("from"), f"{where}: its port open to everyone"
            assert all(set(peer) == {"namespaceSelector"} for peer in rule["from"]), f"{where}: {rule}"
            scraped = True
        for rule in policy["spec"].get("egress", []):
            assert rule.get("ports"), f"{where}: an egress rule without ports opens every port"
    monitored = any(doc["kind"] == "ServiceMonitor" for doc in docs)
    assert scraped == monitored, "Prometheus, and only with the ServiceMonitor, scrapes the dispatcher"

    ports = egress_ports(docs, DISPATCHER)
    settings = settings_map(docs)["data"]
    redis_port = urllib.parse.urlsplit(settings["REDIS_URL"]).port or 6379
    assert {("UDP", 53), ("TCP", 53), ("TCP", redis_port), ("TCP", 80), ("TCP", 443)} <= ports, ports
    assert ports <= {("UDP", 53), ("TCP", 53), ("TCP", redis_port), ("TCP", 80), ("TCP", 443)}, ports
    # Each receiver of WEBHOOK_URL on a port the policy lets out.
    for url in settings["WEBHOOK_URL"].replace(",", " ").split():
        parts = urllib.parse.urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}[parts.scheme]
        assert ("TCP", port) in ports, f"{url}: port {port} is closed to the dispatcher"
    # Redis pods of the overlay, by their labels, on Redis' port.
    redis_pods = [
        labels_of(t)
        for _, t in pod_templates(docs)
        if labels_of(t).get("app.kubernetes.io/component") == "redis"
    ]
    rules = [rule for policy in policies for rule in policy["spec"].get("egress", [])]
    for labels in redis_pods:
        assert any(
            ("TCP", redis_port) in {(p.get("protocol", "TCP"), p.get("port")) for p in rule["ports"]}
            and any(
                "podSelector" in peer and selects(peer["podSelector"], labels) for peer in rule.get("to", [])
            )
            for rule in rules
        ), "the dispatcher cannot reach the Redis pods"
    if not redis_pods:  # Redis elsewhere, by address
        assert any(
            ("TCP", redis_port) in {(p.get("protocol", "TCP"), p.get("port")) for p in rule["ports"]}
            and any("ipBlock" in peer for peer in rule.get("to", []))
            for rule in rules
        ), "the dispatcher cannot reach the external Redis"


def test_a_broken_manifest_fails_these_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The checks above can fail: an unknown field fails strict validation on the
    oldest and newest versions, a Service whose selector has a typo fails the
    Service check, and each way of breaking the edge pod's socket fails the
    wiring check (run on broken copies of the dev overlay)."""
    docs = copy.deepcopy(overlay("dev"))
    edge = named(docs, "Deployment", "edge")
    edge["spec"]["strategy"]["rollingUpdate"]["maxSurprise"] = 1
    for version in (VERSIONS[0], VERSIONS[-1]):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(edge, version, strict=True)

    def env(container: Doc, key: str, value: str) -> None:
        next(e for e in container["env"] if e["name"] == key)["value"] = value

    def unmount(container: Doc) -> None:
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != socket_dir()]

    def elsewhere(container: Doc) -> None:
        next(m for m in container["volumeMounts"] if m["mountPath"] == socket_dir())["mountPath"] = "/srv"

    def on_disk(spec: Doc) -> None:
        next(v for v in spec["volumes"] if v["name"] == "stream-sockets")["emptyDir"].pop("medium")

    breakages: dict[str, Callable[[Doc, dict[str, Doc]], object]] = {
        "nginx does not mount the sockets": lambda spec, c: unmount(c["nginx"]),
        "the stream worker mounts them elsewhere": lambda spec, c: elsewhere(c["stream"]),
        "nginx lists more slots": lambda spec, c: env(c["nginx"], "STREAM_SLOTS", "2"),
        "the stream worker binds in another directory": lambda spec, c: env(
            c["stream"], "STREAM_SOCKET_DIR", "/tmp"
        ),
        "nginx crosses the network": lambda spec, c: env(c["nginx"], "STREAM_TRANSPORT", "tcp"),
        "no shared group": lambda spec, c: spec["securityContext"].pop("fsGroup"),
        "the sockets on disk": lambda spec, c: on_disk(spec),
    }

    def rendering(docs: list[Doc]) -> Callable[[str], list[Doc]]:
        return lambda name: docs

    for what, breakage in breakages.items():
        broken = copy.deepcopy(overlay("dev"))
        spec = named(broken, "Deployment", "edge")["spec"]["template"]["spec"]
        breakage(spec, {c["name"]: c for c in spec["containers"]})
        monkeypatch.setitem(globals(), "overlay", rendering(broken))
        with pytest.raises(AssertionError):
            test_the_edge_pod_wires_nginx_to_its_stream_worker_over_a_socket("dev", tmp_path)
            pytest.fail(f"not caught: {what}")  # (pytest.fail raises Failed, not AssertionError)
        monkeypatch.undo()

    broken = copy.deepcopy(overlay("dev"))
    named(broken, "NetworkPolicy", "edge-front-door-only")["spec"]["ingress"][0]["ports"].append(
        {"port": 8000, "protocol": "TCP"}
    )
    monkeypatch.setitem(globals(), "overlay", lambda name: broken)
    with pytest.raises(AssertionError):
        test_over_the_network_only_nginx_takes_requests("dev")
    monkeypatch.undo()

    # The webhook dispatcher: a port opened to everyone, a way out on every
    # port, WEBHOOK_URL without WEBHOOKS, a grace below the lease.
    dispatcher_breakages: dict[str, tuple[Callable[[list[Doc]], object], Callable[[str], object]]] = {
        "its port open": (
            lambda d: (
                named(d, "NetworkPolicy", DISPATCHER)["spec"]
                .setdefault("ingress", [])
                .append({"ports": [{"port": 8000, "protocol": "TCP"}]})
            ),
            test_nothing_connects_to_the_webhook_dispatcher_and_it_goes_out_only_where_it_must,
        ),
        "egress to anything": (
            lambda d: named(d, "NetworkPolicy", DISPATCHER)["spec"]["egress"].append({"to": []}),
            test_nothing_connects_to_the_webhook_dispatcher_and_it_goes_out_only_where_it_must,
        ),
        "a URL, WEBHOOKS off": (
            lambda d: settings_map(d)["data"].update(WEBHOOK_URL="https://example.com/hooks"),
            test_webhooks_is_set_with_webhook_url,
        ),
        "grace below the lease": (
            lambda d: named(d, "Deployment", DISPATCHER)["spec"]["template"]["spec"].update(
                terminationGracePeriodSeconds=20
            ),
            test_rolling_updates_never_drop_capacity_and_grace_outlasts_the_drain,
        ),
        "no WEBHOOK_SECRET": (
            lambda d: container_of(named(d, "Deployment", DISPATCHER), "dispatcher").update(env=[]),
            test_every_setting_a_container_reads_is_given_to_it,
        ),
    }
    for what, (break_dispatcher, check) in dispatcher_breakages.items():
        broken = copy.deepcopy(overlay("dev"))
        break_dispatcher(broken)
        monkeypatch.setitem(globals(), "overlay", rendering(broken))
        with pytest.raises(AssertionError):
            check("dev")
            pytest.fail(f"not caught: {what}")
        monkeypatch.undo()

    service = named(docs, "Service", "publisher-service")
    service["spec"]["selector"] = {key: value + "-typo" for key, value in service["spec"]["selector"].items()}
    monkeypatch.setitem(globals(), "overlay", lambda name: docs)
    with pytest.raises(AssertionError):
        test_services_select_pods_and_ports_that_exist("dev")
