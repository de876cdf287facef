"""The rendered pods of deploy/kubernetes as Docker containers (tests/deploy).

A pod of one container is one Docker container. A pod of several (the edge
pod: nginx and a stream worker) is several, sharing one network namespace, as
a pod's containers do: a placeholder container (Kubernetes' "pause") holds the
namespace, the network aliases, the published ports and the sysctls, and each
of the pod's containers joins it (`--network container:`). An emptyDir that
more than one container mounts is a Docker volume (tmpfs) mounted in each of
them; the others are each container's own tmpfs.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import threading
import time
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


class Container:
    """One container of a pod: its image, environment, user and mounts."""

    def __init__(self, pod: Pod, spec: Doc, images: dict[str, str]):
        self.pod = pod
        self.spec = spec
        self.name: str = spec["name"]
        repository = spec["image"].rsplit(":", 1)[0]
        self.image: str = images.get(repository) or spec["image"]
        self.env = self._environment()
        pod_security = pod.spec.get("securityContext", {})
        security = spec.get("securityContext", {})
        self.user = security.get("runAsUser", pod_security.get("runAsUser"))
        self.group = security.get("runAsGroup", pod_security.get("runAsGroup", self.user))
        # An emptyDir is writable by the pod (0777). Docker gives a tmpfs over
        # a directory of the image that directory's mode: own it instead.
        self.tmpfs = f"uid={self.user},gid={self.group},mode=1777"
        self.docker_name = ""

    def _environment(self) -> dict[str, str]:
        pod = self.pod
        env: dict[str, str] = {}
        for source in self.spec.get("envFrom", []):
            env.update(pod.config("ConfigMap", source["configMapRef"]["name"]))
        fields = {"metadata.name": pod.pod_name, "metadata.namespace": pod.namespace}
        if pod.ip:
            fields["status.podIP"] = pod.ip
        for entry in self.spec.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            ref = entry["valueFrom"]
            if "configMapKeyRef" in ref:
                env[entry["name"]] = pod.config("ConfigMap", ref["configMapKeyRef"]["name"])[
                    ref["configMapKeyRef"]["key"]
                ]
            elif "secretKeyRef" in ref:
                env[entry["name"]] = pod.config("Secret", ref["secretKeyRef"]["name"])[
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
        pod = self.pod
        args: list[str] = []
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in pod.workload["spec"].get("volumeClaimTemplates", [])}
        for mount in self.spec.get("volumeMounts", []):
            path = mount["mountPath"]
            readonly = bool(mount.get("readOnly"))
            if mount["name"] in claims:
                # The PersistentVolume: a directory that outlives the container.
                claim = pod.tmp / f"claim-{mount['name']}"
                claim.mkdir(exist_ok=True)
                claim.chmod(0o777)
                args += ["--mount", f"type=bind,source={claim},target={path}"]
                continue
            volume = volumes[mount["name"]]
            if "emptyDir" in volume and mount["name"] in pod.shared:
                source = pod.shared[mount["name"]]
                args += ["--mount", f"type=volume,source={source},target={path},volume-nocopy"]
                args[-1] += ",readonly" if readonly else ""
            elif "emptyDir" in volume:
                args += ["--tmpfs", f"{path}:{self.tmpfs}" + (",ro" if readonly else "")]
            elif "configMap" in volume:
                data = pod.config("ConfigMap", volume["configMap"]["name"])
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                directory = pod.tmp / mount["name"]
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
                raise AssertionError(f"{pod.name}/{self.name}: volume {mount['name']} of an unknown type")
        if LOCAL and self.name == "nginx":
            args += ["--tmpfs", f"/var/lib/nginx:{self.tmpfs}"]
        return args

    def run_args(self) -> list[str]:
        """`docker run` options and command, after the name and network options."""
        security = self.spec.get("securityContext", {})
        args = ["--label", f"{PROJECT}=1", "--user", f"{self.user}:{self.group}"]
        # fsGroup and supplementalGroups: every process of the pod carries them.
        for group in self.pod.groups:
            args += ["--group-add", str(group)]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        for capability in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", capability]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges:true"]
        limit = self.spec["resources"]["limits"]["memory"]
        args += ["--memory", str(bytes_of(limit))]
        for key, value in self.env.items():
            args += ["-e", f"{key}={value}"]
        args += self._volume_args()
        command = [self.expand(w) for w in self.spec.get("command", [])]
        rest = [self.expand(w) for w in self.spec.get("args", [])]
        if command:
            args += ["--entrypoint", command[0], self.image, *command[1:], *rest]
        else:
            args += [self.image, *rest]
        return args

    def probe(self, kind: str) -> tuple[bool, str]:
        """One probe, as the kubelet runs it: (passed, what happened)."""
        probe = self.spec[kind]
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://127.0.0.1:{self.pod.port(get['port'], self.name)}{get['path']}"
            try:
                answer = requests.get(url, timeout=timeout, allow_redirects=False)
            except requests.RequestException as error:
                return False, f"GET {get['path']}: {type(error).__name__}"
            return (
                200 <= answer.status_code < 400,
                f"GET {get['path']} on {get['port']}: {answer.status_code}",
            )
        command = probe["exec"]["command"]
        done = docker("exec", self.docker_name, *command, check=False, timeout=timeout + 5)
        return done.returncode == 0, f"exec {command}: exit {done.returncode}"

    def logs(self, tail: int = 40) -> str:
        done = docker("logs", "--tail", str(tail), self.docker_name, check=False)
        return f"--- {self.pod.pod_name}/{self.name} ---\n{done.stdout[-4000:]}{done.stderr[-4000:]}"


class Pod:
    """One pod of the render as Docker containers: what `docker run` needs."""

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
        self.docs = docs
        self.namespace = namespace
        self.tmp = tmp / self.pod_name
        self.tmp.mkdir(exist_ok=True)
        pod_security = self.spec.get("securityContext", {})
        self.fs_group: int | None = pod_security.get("fsGroup")
        self.groups = [
            *([self.fs_group] if self.fs_group is not None else []),
            *pod_security.get("supplementalGroups", []),
        ]
        self.containers = {c["name"]: Container(self, c, images) for c in self.spec["containers"]}
        # emptyDirs that more than one container mounts: volume -> Docker volume.
        mounted: dict[str, int] = {}
        for container in self.spec["containers"]:
            for mount in container.get("volumeMounts", []):
                mounted[mount["name"]] = mounted.get(mount["name"], 0) + 1
        self.shared = {
            v["name"]: ""
            for v in self.spec.get("volumes", [])
            if "emptyDir" in v and mounted.get(v["name"], 0) > 1
        }
        self.ports: dict[int, int] = {}
        self.network_holder = ""
        self.volumes: list[str] = []

    @property
    def container(self) -> Container:
        """The pod's one container (most pods have only one)."""
        assert len(self.containers) == 1, f"{self.name} has {len(self.containers)} containers"
        return next(iter(self.containers.values()))

    @property
    def container_name(self) -> str:
        return self.container.docker_name

    @property
    def env(self) -> dict[str, str]:
        return self.container.env

    def config(self, kind: str, name: str) -> dict[str, str]:
        for doc in of_kind(self.docs, kind):
            if doc["metadata"]["name"] == name:
                data = dict(doc.get("data", {}))
                if kind == "Secret":
                    return {k: base64.b64decode(v).decode() for k, v in data.items()}
                return data
        raise AssertionError(f"{kind}/{name} is not in the render")

    def _network_args(self, network: str) -> list[str]:
        """The pod's network namespace: address, names, DNS, ports, sysctls."""
        pod_security = self.spec.get("securityContext", {})
        domain = f"{self.namespace}.svc.cluster.local"
        args = ["--network", network]
        if self.ip:
            args += ["--ip", self.ip]
        if self.stateful:
            governing = self.workload["spec"]["serviceName"]
            for alias in (
                f"{self.pod_name}.{governing}",
                f"{self.pod_name}.{governing}.{self.namespace}.svc",
            ):
                args += ["--network-alias", alias, "--network-alias", f"{alias}.cluster.local"]
        args += ["--dns-search", domain]
        for service in of_kind(self.docs, "Service"):
            if selects(service["spec"].get("selector"), self.template["metadata"]["labels"]):
                svc = service["metadata"]["name"]
                args += ["--network-alias", svc, "--network-alias", f"{svc}.{domain}"]
        for sysctl in pod_security.get("sysctls", []):
            args += ["--sysctl", f"{sysctl['name']}={sysctl['value']}"]
        for container in self.containers.values():
            for port in container.spec.get("ports", []):
                args += ["-p", f"127.0.0.1::{port['containerPort']}"]
        return args

    def _create_shared_volumes(self, network: str) -> None:
        """An emptyDir of the pod as kubelet makes it with fsGroup: owned by that
        group, setgid. Without the world bits the kubelet also leaves, so that
        the test shows the group alone lets every container in."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for name in self.shared:
            source = f"{network}-{self.pod_name}-{name}"
            empty_dir = volumes[name]["emptyDir"] or {}
            options = ["size=" + str(bytes_of(empty_dir.get("sizeLimit", "16Mi")))]
            if self.fs_group is not None:
                options += ["uid=0", f"gid={self.fs_group}", "mode=2770"]
            else:
                options += ["mode=1777"]
            docker(
                *("volume", "create", "--label", f"{PROJECT}=1", "--driver", "local"),
                *("--opt", "type=tmpfs", "--opt", "device=tmpfs", "--opt", "o=" + ",".join(options)),
                source,
            )
            self.volumes.append(source)
            self.shared[name] = source

    def start(self, network: str) -> None:
        base = f"{network}-{self.pod_name}"
        self.network_holder = base
        self._create_shared_volumes(network)
        if len(self.containers) == 1:
            self.container.docker_name = base
            docker("run", "-d", "--name", base, *self._network_args(network), *self.container.run_args())
        else:
            # The pause container: the pod's network namespace, doing nothing.
            first = next(iter(self.containers.values()))
            docker(
                *("run", "-d", "--name", base, "--label", f"{PROJECT}=1", *self._network_args(network)),
                *("--user", "65535:65535", "--read-only", "--cap-drop", "ALL", "--memory", str(16 * 2**20)),
                *("--entrypoint", "sleep", first.image, "infinity"),
            )
            for container in self.containers.values():
                container.docker_name = f"{base}-{container.name}"
                docker(
                    *("run", "-d", "--name", container.docker_name, "--network", f"container:{base}"),
                    *container.run_args(),
                )
        for container in self.containers.values():
            for port in container.spec.get("ports", []):
                mapped = docker("port", base, f"{port['containerPort']}/tcp").stdout
                self.ports[port["containerPort"]] = int(mapped.splitlines()[0].rsplit(":", 1)[1])

    def port(self, port: Any, container: str | None = None) -> int:
        """The host port of a pod's port (by name or number; of one container's ports)."""
        for candidate in self.containers.values():
            if container is not None and candidate.name != container:
                continue
            for offered in candidate.spec.get("ports", []):
                if port in (offered.get("name"), offered["containerPort"]):
                    return self.ports[offered["containerPort"]]
        raise AssertionError(f"{self.name}: no port {port}")

    def probe(self, kind: str, container: str | None = None) -> tuple[bool, str]:
        return (self.containers[container] if container else self.container).probe(kind)

    def logs(self, tail: int = 40) -> str:
        return "\n".join(container.logs(tail) for container in self.containers.values())

    def terminate(self) -> dict[str, tuple[int, float]]:
        """Stop the pod as the kubelet does: in every container at once, its
        preStop, then the image's stop signal (`docker stop`: nginx's SIGQUIT,
        gunicorn's SIGTERM), then SIGKILL when terminationGracePeriodSeconds,
        counted from the start, runs out. Per container: (exit code, seconds
        from the start until it had exited)."""
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        started = time.monotonic()
        stopped: dict[str, tuple[int, float]] = {}
        failures: list[str] = []

        def stop(container: Container) -> None:
            try:
                command = (
                    container.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
                )
                if command:
                    docker("exec", container.docker_name, *command, check=False, timeout=grace + 5)
                left = max(0, int(grace - (time.monotonic() - started)))
                docker("stop", "--time", str(left), container.docker_name, timeout=grace + 30)
                code = docker("inspect", "--format", "{{.State.ExitCode}}", container.docker_name).stdout
                stopped[container.name] = (int(code), time.monotonic() - started)
            except (AssertionError, subprocess.SubprocessError, ValueError) as error:
                stopped[container.name] = (-1, time.monotonic() - started)
                failures.append(f"{container.name}: {error}")

        threads = [threading.Thread(target=stop, args=(c,)) for c in self.containers.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        return stopped

    def remove(self) -> None:
        names = [c.docker_name for c in self.containers.values() if c.docker_name]
        if self.network_holder and self.network_holder not in names:
            names.append(self.network_holder)
        if names:
            docker("rm", "-f", "-v", *names, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)
        self.volumes = []
