"""Compose mode: the bench measures the Compose stack users run (compose.yaml, as shipped).

It is brought up the way the e2e suite does it (tests.e2e.support.compose_command:
scripts/compose-local.sh, or HERALD_E2E_COMPOSE) under its own project name,
`herald-bench-<pid>`, with nginx published on a free loopback port, and always
taken down again with its volume (`down -v --remove-orphans`), also on error,
Ctrl-C or SIGTERM. Only what the bench must change differs from the defaults:
no publish rate limit (so nginx's limiter does not measure itself), room for
the idle streams (MAX_CONNECTIONS), no PUBLISH_TOKEN, and STREAM_TRANSPORT
as the bench's --transport says (unix, compose's default: nginx reaches the
stream replica over a Unix socket on a shared volume; tcp: across the compose
network to stream-service:8000). The bench checks that nginx's rendered
configuration routes streams that way before it measures anything.

Clients reach nginx two ways (`Route`): "proxy", at 127.0.0.1:<published port>
on the host, through Docker's userland proxy (docker-proxy); and "netns", from
inside nginx's own network namespace at 127.0.0.1:80 (tests.load.netns), as
clients on other hosts would (no proxy). The bench reads the stream service's
/stats and Redis at their compose-network addresses, which the host reaches.

CPU is cgroup accounting per container (v1 cpuacct.usage, v2 cpu.stat), so it
includes everything the container runs (its healthchecks too); docker-proxy's
is read from /proc and kept apart. Memory is the VmRSS sum of the container's
processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.e2e.support import compose_command
from tests.load.netns import of_pid
from tests.load.stack import Kind, Route, children, cpu_seconds, open_files_limit, rss_kb
from tests.support.services import ROOT, free_port

COMPOSE_FILE = ROOT / "compose.yaml"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Component name -> compose service.
SERVICES = {"nginx": "nginx", "stream": "stream-service", "publisher": "publisher-service", "redis": "redis"}
PROXY = "docker-proxy"
# What nginx's rendered configuration proxies streams to, by STREAM_TRANSPORT (nginx/entrypoint.sh).
STREAM_TARGETS = {"unix": "herald_streams", "tcp": "stream-service:8000"}
UP_TIMEOUT = 900  # the first run builds the images (and, on a fresh host, the local base images)
# Open files docker-proxy holds per proxied connection: both sockets, and for each
# direction of the copy a pipe (2 fds) for splice(2). At its RLIMIT_NOFILE it exits,
# and Docker does not start it again: the published port is dead until nginx restarts.
# It died here at ~3,150 held streams of a 20,000 limit (more were being opened), so
# the bench stays at 90% of the limit.
PROXY_FDS_PER_STREAM = 6
PROXY_FDS_USABLE = 0.9
# Variables of compose.yaml the caller's environment may keep: which images to build from.
IMAGE_VARIABLES = {"PYTHON_IMAGE", "REDIS_IMAGE", "NGINX_IMAGE", "PIP_INDEX_ARGS"}


def bench_settings(project: str, port: int, max_connections: int, transport: str = "unix") -> dict[str, str]:
    """The bench stack's settings: compose.yaml's defaults except for these."""
    return {
        # How nginx reaches the stream replicas (nginx/entrypoint.sh).
        "STREAM_TRANSPORT": transport,
        "COMPOSE_PROJECT_NAME": project,
        "HERALD_BIND": "127.0.0.1",
        "HERALD_PORT": str(port),
        "PUBLISH_RATE": "100000r/s",
        "PUBLISH_BURST": "100000",
        # Every bench client is one address: lift the per-address stream limit.
        "STREAMS_PER_IP": "65535",
        "MAX_CONNECTIONS": str(max_connections),
        "PUBLISH_TOKEN": "",
    }


def compose_env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment minus Herald's settings, plus the bench's.

    Compose prefers the environment to the env file: a PUBLISH_TOKEN or
    HEARTBEAT_SECONDS exported in the caller's shell would change the stack.
    """
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text())) - IMAGE_VARIABLES
    env = {k: v for k, v in os.environ.items() if k not in names}
    return {**env, **settings}


# -- cgroups ----------------------------------------------------------------------


@dataclass(frozen=True)
class Cgroup:
    """A container's cgroup: its CPU time counter and its processes."""

    cpu_file: Path  # cpuacct.usage (v1, ns) or cpu.stat (v2, usage_usec)
    procs: Path

    def cpu_seconds(self) -> float:
        text = self.cpu_file.read_text()
        if self.cpu_file.name == "cpuacct.usage":
            return int(text) / 1e9
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise RuntimeError(f"no usage_usec in {self.cpu_file}")

    def pids(self) -> list[int]:
        return [int(line) for line in self.procs.read_text().split()]

    def rss_kb(self) -> int:
        """The VmRSS sum of the cgroup's processes, in KiB."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, RuntimeError):  # a process that just exited
                total += rss_kb(pid)
        return total

    @property
    def version(self) -> int:
        return 1 if self.cpu_file.name == "cpuacct.usage" else 2


def cgroup_of(pid: int) -> Cgroup:
    """The CPU-accounting cgroup of a process, from /proc/<pid>/cgroup: v1 cpuacct first, else v2."""
    unified: str | None = None
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpuacct" in controllers.split(","):
            for mount in dict.fromkeys((controllers, "cpuacct", "cpu,cpuacct")):
                where = CGROUP_ROOT / mount / path.lstrip("/")
                if (where / "cpuacct.usage").exists():
                    return Cgroup(where / "cpuacct.usage", where / "cgroup.procs")
        elif controllers == "":
            unified = path.lstrip("/")
    for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        where = base / (unified or "")
        if unified is not None and (where / "cpu.stat").exists():
            return Cgroup(where / "cpu.stat", where / "cgroup.procs")
    raise RuntimeError(f"no CPU accounting cgroup found for pid {pid} (/proc/{pid}/cgroup)")


# -- containers and docker-proxy -----------------------------------------------------


@dataclass(frozen=True)
class Container:
    service: str
    id: str
    pid: int  # the container's main process, on the host
    ip: str  # on the compose network
    image: str
    cgroup: Cgroup


def docker(*args: str, timeout: float = 60) -> str:
    run = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {run.stderr.strip()}")
    return run.stdout


def find_container(project: str, service: str) -> Container:
    """The one running container of a service of the project."""
    ids = docker(
        "ps",
        "-q",
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    ).split()
    if len(ids) != 1:
        raise RuntimeError(f"expected one running {service} container in {project}, found {ids}")
    template = (
        "{{.Id}} {{.State.Pid}} {{.Config.Image}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    )
    full_id, pid, image, ip, *_ = docker("inspect", "-f", template, ids[0]).split()
    return Container(service, full_id, int(pid), ip, image, cgroup_of(int(pid)))


def proxy_pids(port: int) -> list[int]:
    """The docker-proxy processes that forward the host's `port` (none when Docker has no userland proxy)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args[0].endswith(b"docker-proxy") or b"-host-port" not in args[:-1]:
            continue
        if args[args.index(b"-host-port") + 1] == str(port).encode():
            found.append(int(entry.name))
    return sorted(found)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (and so do the children it starts)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the stack ----------------------------------------------------------------------------


@dataclass
class ComposeStack:
    """A Compose project of Herald started by the bench; implements tests.load.stack.BenchStack."""

    project: str
    port: int
    env_file: Path
    settings: dict[str, str]
    log_dir: Path
    paths: tuple[str, ...] = ("proxy", "netns")
    containers: dict[str, Container] = field(default_factory=dict)
    proxies: list[int] = field(default_factory=list)
    mode: str = "compose"

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True, prepare: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run Compose on this project; `prepare` lets compose-local.sh build missing local images."""
        env = compose_env(self.settings)
        if not prepare:
            env["HERALD_SKIP_PREPARE"] = "1"
        command = [*compose_command(), "-p", self.project, "--env-file", str(self.env_file), *args]
        run = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
        return run

    def discover(self) -> None:
        """Find the containers, their cgroups and addresses, and the docker-proxy of the port."""
        self.containers = {name: find_container(self.project, svc) for name, svc in SERVICES.items()}
        self.proxies = proxy_pids(self.port)

    # -- BenchStack --------------------------------------------------------------------

    @property
    def stats(self) -> tuple[str, int]:
        return (self.containers["stream"].ip, 8000)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.containers['redis'].ip}:6379/0"

    @property
    def heartbeat_seconds(self) -> float:
        return float(self.settings.get("HEARTBEAT_SECONDS", "15"))

    @property
    def transport(self) -> str:
        """STREAM_TRANSPORT of this stack: how nginx reaches the stream replica."""
        return self.settings.get("STREAM_TRANSPORT", "unix")

    def stream_target(self) -> str:
        """What nginx's rendered configuration proxies /stream to (`set $stream ...;`)."""
        run = subprocess.run(
            ["docker", "exec", self.containers["nginx"].id, "cat", "/etc/nginx/conf.d/herald.conf"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        found = re.search(r"^\s*set \$stream (\S+);", run.stdout, re.MULTILINE)
        return found.group(1) if found else f"? ({run.stderr.strip() or 'no set $stream line'})"

    def check_transport(self) -> None:
        """Refuse to measure a stack whose nginx does not route streams as STREAM_TRANSPORT says."""
        target = self.stream_target()
        expected = STREAM_TARGETS.get(self.transport)
        if target != expected:
            raise RuntimeError(
                f"STREAM_TRANSPORT={self.transport}, but nginx proxies streams to {target!r}, "
                f"not {expected!r}: does this checkout's nginx/entrypoint.sh read STREAM_TRANSPORT?"
            )

    def routes(self, scenario: str) -> list[Route]:
        """Every scenario on each selected path: via docker-proxy, and inside nginx's netns."""
        nginx = self.containers["nginx"]
        host = ("127.0.0.1", self.port)
        inside = ("127.0.0.1", 80)
        all_routes = {
            "proxy": Route(
                "proxy", host, host, None, via=f"host clients, 127.0.0.1:{self.port} through docker-proxy"
            ),
            "netns": Route(
                "netns", inside, inside, of_pid(nginx.pid), via="clients in nginx's netns, 127.0.0.1:80"
            ),
        }
        return [all_routes[name] for name in self.paths]

    def cpu(self) -> dict[str, float]:
        figures = {name: c.cgroup.cpu_seconds() for name, c in self.containers.items()}
        figures[PROXY] = cpu_seconds(self.proxies)
        return figures

    def rss_kb(self) -> dict[str, int]:
        figures = {name: c.cgroup.rss_kb() for name, c in self.containers.items()}
        figures[PROXY] = 0
        for pid in self.proxies:
            with contextlib.suppress(OSError, RuntimeError):  # exited (a zombie has no VmRSS)
                figures[PROXY] += rss_kb(pid)
        return figures

    def stream_limit(self, route: Route) -> tuple[int, str] | None:
        """On the proxy path: the streams docker-proxy can hold within its open-file limit."""
        limits = [open_files_limit(pid) for pid in self.proxies]
        if route.name != "proxy" or not limits or min(limits) <= 0:
            return None
        limit = min(limits)
        most = int(limit * PROXY_FDS_USABLE) // PROXY_FDS_PER_STREAM
        why = f"docker-proxy: {PROXY_FDS_PER_STREAM} open files per stream, limit {limit:,}"
        return most, why

    def check(self) -> str | None:
        """Restart nginx when its docker-proxy died: Docker starts a new one only with the container."""
        if not self.proxies or proxy_pids(self.port):
            return None
        self.compose("restart", "--timeout", "10", "nginx", timeout=120)
        self.compose("up", "-d", "--wait", "--no-build", "--no-recreate", timeout=180)
        self.discover()
        return f"docker-proxy for port {self.port} exited (open-file limit?); nginx was restarted"

    def counted(self, kind: Kind) -> tuple[str, ...]:
        """Publishing never reaches the stream service; everything else is the whole stack."""
        return ("publisher", "nginx", "redis") if kind == "publish" else tuple(SERVICES)

    def worker_pids(self, service: str) -> list[int]:
        """gunicorn's workers: the children of the container's main process (the arbiter)."""
        return children(self.containers[service].pid)

    def headline(self) -> str:
        images = ", ".join(f"{c.service} {c.image}" for c in self.containers.values())
        return (
            f"compose mode, stream transport {self.transport}: project {self.project}; {images}; "
            f"nginx {self.nginx_version()}"
        )

    def nginx_version(self) -> str:
        run = subprocess.run(
            ["docker", "exec", self.containers["nginx"].id, "nginx", "-v"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return (run.stderr or run.stdout).strip().split("/")[-1]

    def redis_version(self) -> str:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()

    def nginx_workers(self) -> list[int]:
        """nginx's workers: the master's children that are nginx (the stand-in also runs a watcher)."""
        found = []
        for pid in children(self.containers["nginx"].pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
                    found.append(pid)
        return found

    def describe(self) -> dict[str, object]:
        nginx_workers = self.nginx_workers()
        stream_workers = self.worker_pids("stream")
        return {
            "mode": self.mode,
            "transport": self.transport,
            "stream_target": self.stream_target(),
            "project": self.project,
            "compose": compose_command(),
            "settings": self.settings,
            "paths": list(self.paths),
            "containers": {
                name: {"service": c.service, "image": c.image, "ip": c.ip, "cgroup_version": c.cgroup.version}
                for name, c in self.containers.items()
            },
            "nginx": {"version": self.nginx_version(), "workers": len(nginx_workers)},
            "redis": {"version": self.redis_version(), "url": self.redis_url},
            "docker_proxy": {"pids": self.proxies},
            "open_files_limit": {
                "stream_worker": open_files_limit(stream_workers[0]) if stream_workers else -1,
                "nginx_worker": open_files_limit(nginx_workers[0]) if nginx_workers else -1,
                PROXY: open_files_limit(self.proxies[0]) if self.proxies else -1,
            },
        }

    def stop(self) -> None:
        """Save the end of the logs, then remove the project with its volume and images."""
        with signals_ignored():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                logs = self.compose("logs", "--no-color", "--tail", "500", timeout=60, check=False)
                (self.log_dir / "compose.log").write_text(logs.stdout + logs.stderr)
            down = self.compose(
                "down",
                "-v",
                "--rmi",
                "local",
                "--remove-orphans",
                "--timeout",
                "10",
                timeout=300,
                check=False,
            )
            if down.returncode != 0:
                self.force_remove()

    def force_remove(self) -> None:
        """When `down` failed: remove the project's containers and volumes by label."""
        label = f"label=com.docker.compose.project={self.project}"
        for kind, remove in (("ps", ["rm", "-f"]), ("volume", ["volume", "rm", "-f"])):
            listing = ["ps", "-aq"] if kind == "ps" else ["volume", "ls", "-q"]
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                found = docker(*listing, "--filter", label).split()
                if found:
                    docker(*remove, *found, timeout=120)


def start_compose(
    tmp: Path,
    *,
    max_connections: int,
    paths: tuple[str, ...],
    transport: str = "unix",
    extra: dict[str, str] | None = None,
) -> ComposeStack:
    """`up --build --wait` of the bench's own project; taken down again if anything fails.

    `transport`: STREAM_TRANSPORT (tests.load.stack.TRANSPORTS); `extra`: more
    settings (the TLS bench's certificate, tests/load/tls.py).
    """
    project = f"herald-bench-{os.getpid()}"
    port = free_port()
    settings = {**bench_settings(project, port, max_connections, transport), **(extra or {})}
    env_file = tmp / "bench.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    stack = ComposeStack(project, port, env_file, settings, tmp, paths)
    try:
        stack.compose("up", "--build", "--wait", timeout=UP_TIMEOUT, prepare=True)
        stack.discover()
        stack.check_transport()
    except BaseException:
        stack.stop()
        raise
    return stack
