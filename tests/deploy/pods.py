"""The rendered pods of deploy/kubernetes as Docker containers (tests/deploy)."""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.deploy.manifests import ROOT, Doc, of_kind, selects
from tests.support.docker import REDIS_IMAGE

PROJECT = "herald-deploytest"
# With HERALD_IMAGES=local (scripts/test-env.sh) the official images are not
# available; the local stand-ins run instead (Debian's nginx 1.22 has no
# `resolve`, and keeps its temporary files under /var/lib/nginx).
LOCAL = REDIS_IMAGE.startswith("herald-local/")


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode:
        raise AssertionError(f"docker {' '.join(args[:3])} ... failed: {done.stderr.strip()}")
    return done


def build_service_images() -> dict[str, str]:
    """The two service images, built from this checkout as the e2e stack builds them."""
    compose = shlex.split(os.environ.get("HERALD_E2E_COMPOSE", "docker compose"))
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT}
    done = subprocess.run(
        [*compose, "build", "publisher-service", "stream-service"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"building the images failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {
        "herald/publisher-service": f"{PROJECT}-publisher-service",
        "herald/stream-service": f"{PROJECT}-stream-service",
    }


def bytes_of(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, quantity
    return int(match.group(1)) * {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match.group(2)]


class Pod:
    """One pod of the render as a container: what `docker run` needs."""

    def __init__(
        self,
        workload: Doc,
        docs: list[Doc],
        namespace: str,
        images: dict[str, str],
        tmp: Path,
        *,
        replica: int = 0,
        ip: str | None = None,
    ):
        self.workload = workload
        self.name = workload["metadata"]["name"]
        # A StatefulSet's pods are <name>-<ordinal>; others keep the workload's name here.
        self.stateful = workload["kind"] == "StatefulSet"
        self.pod_name = f"{self.name}-{replica}" if self.stateful else self.name
        self.ip = ip
        self.template = workload["spec"]["template"]
        self.spec = self.template["spec"]
        assert len(self.spec["containers"]) == 1, "one container per pod here"
        self.container = self.spec["containers"][0]
        self.docs = docs
        self.namespace = namespace
        self.tmp = tmp / self.pod_name
        self.tmp.mkdir(exist_ok=True)
        repository = self.container["image"].rsplit(":", 1)[0]
        self.image = images.get(repository, self.container["image"])
        self.env = self._environment()
        self.ports: dict[int, int] = {}
        pod_security = self.spec.get("securityContext", {})
        security = self.container.get("securityContext", {})
        self.user = security.get("runAsUser", pod_security.get("runAsUser"))
        self.group = security.get("runAsGroup", pod_security.get("runAsGroup", self.user))
        # An emptyDir is writable by the pod (0777). Docker gives a tmpfs over
        # a directory of the image that directory's mode: own it instead.
        self.tmpfs = f"uid={self.user},gid={self.group},mode=1777"

    def _config(self, kind: str, name: str) -> dict[str, str]:
        for doc in of_kind(self.docs, kind):
            if doc["metadata"]["name"] == name:
                data = dict(doc.get("data", {}))
                if kind == "Secret":
                    return {k: base64.b64decode(v).decode() for k, v in data.items()}
                return data
        raise AssertionError(f"{kind}/{name} is not in the render")

    def _environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            env.update(self._config("ConfigMap", source["configMapRef"]["name"]))
        fields = {"metadata.name": self.pod_name, "metadata.namespace": self.namespace}
        if self.ip:
            fields["status.podIP"] = self.ip
        for entry in self.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            ref = entry["valueFrom"]
            if "configMapKeyRef" in ref:
                env[entry["name"]] = self._config("ConfigMap", ref["configMapKeyRef"]["name"])[
                    ref["configMapKeyRef"]["key"]
                ]
            elif "secretKeyRef" in ref:
                env[entry["name"]] = self._config("Secret", ref["secretKeyRef"]["name"])[
                    ref["secretKeyRef"]["key"]
                ]
            elif ref.get("fieldRef", {}).get("fieldPath") in fields:
                env[entry["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        if LOCAL and self.name == "nginx":
            env["NGINX_UPSTREAM_RESOLVE"] = ""
        return env

    def expand(self, word: str) -> str:
        """Kubernetes' $(VAR) in command and args."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: self.env.get(m.group(1), m.group(0)), word)

    def _volume_args(self) -> list[str]:
        args: list[str] = []
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in self.workload["spec"].get("volumeClaimTemplates", [])}
        for mount in self.container.get("volumeMounts", []):
            path = mount["mountPath"]
            if mount["name"] in claims:
                # The PersistentVolume: a directory that outlives the container.
                claim = self.tmp / f"claim-{mount['name']}"
                claim.mkdir(exist_ok=True)
                claim.chmod(0o777)
                args += ["--mount", f"type=bind,source={claim},target={path}"]
                continue
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                args += ["--tmpfs", f"{path}:{self.tmpfs}"]
            elif "configMap" in volume:
                data = self._config("ConfigMap", volume["configMap"]["name"])
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                directory = self.tmp / mount["name"]
                for item in items:
                    target = directory / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(data[item["key"]])
                    target.chmod(0o644)
                for sub in [directory, *directory.rglob("*")]:
                    if sub.is_dir():
                        sub.chmod(0o755)
                source = directory / mount["subPath"] if "subPath" in mount else directory
                args += ["--mount", f"type=bind,source={source},target={path},readonly"]
            else:
                raise AssertionError(f"{self.name}: volume {mount['name']} of an unknown type")
        if LOCAL and self.name == "nginx":
            args += ["--tmpfs", f"/var/lib/nginx:{self.tmpfs}"]
        return args

    def run_args(self, network: str) -> list[str]:
        pod_security = self.spec.get("securityContext", {})
        security = self.container.get("securityContext", {})
        domain = f"{self.namespace}.svc.cluster.local"
        args = ["run", "-d", "--name", f"{network}-{self.pod_name}", "--network", network]
        if self.ip:
            args += ["--ip", self.ip]
        if self.stateful:
            governing = self.workload["spec"]["serviceName"]
            for alias in (
                f"{self.pod_name}.{governing}",
                f"{self.pod_name}.{governing}.{self.namespace}.svc",
            ):
                args += ["--network-alias", alias, "--network-alias", f"{alias}.cluster.local"]
        args += ["--label", f"{PROJECT}=1", "--dns-search", domain]
        for service in of_kind(self.docs, "Service"):
            if selects(service["spec"].get("selector"), self.template["metadata"]["labels"]):
                svc = service["metadata"]["name"]
                args += ["--network-alias", svc, "--network-alias", f"{svc}.{domain}"]
        args += ["--user", f"{self.user}:{self.group}"]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for capability in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", capability]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges:true"]
        for sysctl in pod_security.get("sysctls", []):
            args += ["--sysctl", f"{sysctl['name']}={sysctl['value']}"]
        limit = self.container["resources"]["limits"]["memory"]
        args += ["--memory", str(bytes_of(limit))]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        for port in self.container.get("ports", []):
            args += ["-p", f"127.0.0.1::{port['containerPort']}"]
        args += self._volume_args()
        command = [self.expand(w) for w in self.container.get("command", [])]
        rest = [self.expand(w) for w in self.container.get("args", [])]
        if command:
            args += ["--entrypoint", command[0], self.image, *command[1:], *rest]
        else:
            args += [self.image, *rest]
        return args

    def start(self, network: str) -> None:
        docker(*self.run_args(network))
        self.container_name = f"{network}-{self.pod_name}"
        for port in self.container.get("ports", []):
            mapped = docker("port", self.container_name, f"{port['containerPort']}/tcp").stdout
            self.ports[port["containerPort"]] = int(mapped.splitlines()[0].rsplit(":", 1)[1])

    def port(self, port: Any) -> int:
        for offered in self.container.get("ports", []):
            if port in (offered.get("name"), offered["containerPort"]):
                return self.ports[offered["containerPort"]]
        raise AssertionError(f"{self.name}: no port {port}")

    def probe(self, kind: str) -> tuple[bool, str]:
        """One probe, as the kubelet runs it: (passed, what happened)."""
        probe = self.container[kind]
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://127.0.0.1:{self.port(get['port'])}{get['path']}"
            try:
                answer = requests.get(url, timeout=timeout, allow_redirects=False)
            except requests.RequestException as error:
                return False, f"GET {get['path']}: {type(error).__name__}"
            return (
                200 <= answer.status_code < 400,
                f"GET {get['path']} on {get['port']}: {answer.status_code}",
            )
        command = probe["exec"]["command"]
        done = docker("exec", self.container_name, *command, check=False, timeout=timeout + 5)
        return done.returncode == 0, f"exec {command}: exit {done.returncode}"

    def logs(self) -> str:
        done = docker("logs", "--tail", "40", self.container_name, check=False)
        return f"--- {self.name} ---\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
