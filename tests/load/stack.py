"""The stacks the bench measures: their common interface, and the direct one, all on loopback.

`BenchStack` is what the bench needs from a stack: the routes clients take
(`Route`), CPU time and memory by component, and which components a target
counts. Two implement it: `Stack` here (direct mode) and
tests.load.compose.ComposeStack (compose mode, the Compose stack users run).

Direct mode: Redis comes from a local Docker image (or REDIS_URL), the publisher and ONE
stream worker are real gunicorn processes started with their own
gunicorn.conf.py (tests.support.services.start_service), and nginx is the
distribution's binary run as a child process with a temporary prefix and
Herald's own template rendered the way the nginx image's entrypoint does it.
nginx reaches the stream worker the way STREAM_TRANSPORT says under Compose
(`transport`): "unix", over the worker's slot socket (STREAM_SOCKET_DIR in the
temporary directory, one slot), or "tcp", at its loopback port.
Every process is started here and stopped here, by its own id.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import redis

from tests.support.services import ROOT, Service, free_port, start_service, wait_ready

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_REDIS_IMAGE = "herald-local/redis:bookworm"
TEMPLATE = ROOT / "nginx" / "templates" / "herald.conf.template"
ERROR_CORS = ROOT / "nginx" / "templates" / "herald-error-cors.inc.template"
HTML_ROOT = ROOT / "nginx" / "html"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

# The variables compose.yaml passes to the nginx template, with the bench's values:
# the publish rate limit is lifted so that it measures Herald, not the limiter.
NGINX_VARS = {
    "MAX_BODY_BYTES": "1048576",
    "PUBLISH_RATE": "100000r/s",
    "PUBLISH_BURST": "100000",
    "STREAM_READ_TIMEOUT": "1h",
    "UPSTREAM_CONNECT_TIMEOUT": "1s",
    "DNS_VALID": "2s",
    "RETRY_AFTER_SECONDS": "2",
    "NGINX_MAX_STREAMS": "16000",
    # The limits per client address are lifted too (every bench client is one
    # address); no trusted proxies (nginx/entrypoint.sh renders REAL_IP_FROM).
    "STREAMS_PER_IP": "16000",
    "READ_RATE": "100000r/s",
    "READ_BURST": "100000",
    "HERALD_REAL_IP": "",
    "HERALD_CORS_ORIGINS": "",
    # What nginx/entrypoint.sh renders under Compose: Docker's DNS, names as written.
    "HERALD_RESOLVER": "127.0.0.11",
    "HERALD_SERVICE_DOMAIN": "",
    # No `resolve` in the upstream block: the services are at fixed loopback ports
    # (and Debian's nginx 1.22 does not have it).
    "NGINX_UPSTREAM_RESOLVE": "",
    # No TLS (nginx/entrypoint.sh renders these empty without a certificate).
    "HERALD_TLS_LISTEN": "",
    "HERALD_TLS_REDIRECT": "",
    "HERALD_HSTS": "",
}


TRANSPORTS = ("unix", "tcp")  # STREAM_TRANSPORT: how nginx reaches the stream workers

Address = tuple[str, int]
# What a target counts: CPU per delivered event, per publish, or memory and CPU of idle streams.
Kind = Literal["delivery", "publish", "idle"]


@dataclass(frozen=True)
class Route:
    """How the clients reach the stack on one measured path."""

    name: str  # "direct", "nginx" (direct mode); "proxy", "netns" (compose mode)
    stream: Address  # where SSE clients connect
    publish: Address  # where publishes go
    netns: str | None = None  # the network namespace clients connect from (None: the host's)
    via: str = ""  # what is in between, for the report


class BenchStack(Protocol):
    """What the bench needs from a running stack, whichever way it was started."""

    mode: str

    @property
    def stats(self) -> Address:
        """Where the stream service's /stats answers (its one worker), from the host."""
        ...

    @property
    def redis_url(self) -> str:
        """The stack's Redis, from the host."""
        ...

    @property
    def heartbeat_seconds(self) -> float: ...

    def routes(self, scenario: str) -> list[Route]:
        """The paths a scenario is measured on, in order."""
        ...

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far, by component ("stream", "nginx", ...)."""
        ...

    def rss_kb(self) -> dict[str, int]:
        """Resident memory now, by component, in KiB."""
        ...

    def counted(self, kind: Kind) -> tuple[str, ...]:
        """The components whose sum a target judges (the others are for information)."""
        ...

    def worker_pids(self, service: str) -> list[int]:
        """Host pids of a service's workers ("stream", "publisher"), e.g. for py-spy."""
        ...

    def stream_limit(self, route: Route) -> tuple[int, str] | None:
        """How many streams something on the route can hold at most, and why (None: no such limit)."""
        ...

    def check(self) -> str | None:
        """After a scenario: what broke in the stack, now repaired (None when all is well)."""
        ...

    def headline(self) -> str:
        """One line about the stack for the report."""
        ...

    def describe(self) -> dict[str, object]:
        """Versions, settings and limits, for the JSON report."""
        ...

    def stop(self) -> None:
        """Stop everything the bench started for this stack."""
        ...


# -- /proc ---------------------------------------------------------------------


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by everything it starts).

    To the hard limit at least; above it when allowed (root), so that one stream
    worker can hold 20,000 connections while the clients hold the other ends.
    Returns the soft limit now in force.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (/proc/stat), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # guest time is already in user


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a running process (from /proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return -1


def children(pid: int) -> list[int]:
    """Direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop one process we started: `sig`, then SIGKILL after `timeout`."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# -- Redis -----------------------------------------------------------------------


@dataclass
class RedisServer:
    url: str
    container: str | None = None
    data_dir: Path | None = None
    network: str = "external"

    def version(self) -> str:
        client = redis.Redis.from_url(self.url)
        try:
            return str(client.info("server").get("redis_version", "?"))
        finally:
            client.close()

    def pids(self) -> list[int]:
        """redis-server's host pid (for information only; the bench never counts it as Herald's)."""
        if not self.container:
            return []
        run = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", self.container],
            capture_output=True,
            text=True,
            check=False,
        )
        pid = run.stdout.strip()
        return [int(pid)] if pid.isdigit() and int(pid) > 0 and Path(f"/proc/{pid}").exists() else []

    def stop(self) -> None:
        if self.container:
            subprocess.run(
                ["docker", "rm", "-f", self.container], capture_output=True, timeout=60, check=False
            )
            self.container = None


def _wait_redis(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            if client.ping():
                return
        except redis.RedisError as exc:
            last = exc
        finally:
            client.close()
        time.sleep(0.1)
    raise TimeoutError(f"Redis at {url} did not answer in {timeout} s: {last}")


def redis_image() -> str:
    """HERALD_TEST_REDIS_IMAGE, else the local stand-in image (scripts/build-local-images.sh)."""
    return os.environ.get("HERALD_TEST_REDIS_IMAGE") or DEFAULT_REDIS_IMAGE


def start_redis(tmp: Path, image: str, fsync: str = "always") -> RedisServer:
    """A throwaway Redis from a local image, configured like compose.yaml's.

    AOF with fsync on every write (`fsync`: compose's "always"; "everysec" or
    "no" to see what durability costs), data in a host directory (as compose's
    volume). Host networking when Docker allows it: Redis then listens on
    127.0.0.1 itself, with no docker-proxy copying every byte in between.
    """
    if shutil.which("docker") is None:
        raise RuntimeError("the bench needs Docker for Redis (or set REDIS_URL to an existing Redis)")
    data = tmp / "redis-data"
    data.mkdir()
    data.chmod(0o777)  # the image may run redis-server as its own user
    port = free_port()
    common = ["docker", "run", "-d", "--rm", "-v", f"{data}:/data"]
    server = ["redis-server", "--protected-mode", "no", "--appendonly", "yes", "--appendfsync", fsync]
    server += ["--dir", "/data", "--save", ""]
    attempts = [
        ("host", [*common, "--network", "host", image, *server, "--bind", "127.0.0.1", "--port", str(port)]),
        ("published", [*common, "-p", f"127.0.0.1:{port}:6379", image, *server, "--bind", "0.0.0.0"]),
    ]
    errors = []
    for network, command in attempts:
        run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if run.returncode != 0:
            errors.append(f"{network}: {run.stderr.strip()}")
            continue
        server_ = RedisServer(f"redis://127.0.0.1:{port}/0", run.stdout.strip(), data, network)
        try:
            _wait_redis(server_.url)
        except TimeoutError as exc:
            logs = subprocess.run(
                ["docker", "logs", server_.container or ""], capture_output=True, text=True, check=False
            )
            server_.stop()
            errors.append(f"{network}: {exc}\n{logs.stdout}{logs.stderr}")
            continue
        return server_
    raise RuntimeError(f"could not start Redis from {image}:\n" + "\n".join(errors))


# -- nginx -----------------------------------------------------------------------


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)


def apt_install(package: str) -> None:
    """Install one of Debian's packages (the caller checked that this runs as root with apt-get)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stdout}{run.stderr}")


def ensure_nginx() -> str:
    """The nginx binary; installs Debian's package when missing and running as root."""
    found = find_nginx()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            "the bench needs nginx: install Debian's package first (sudo apt-get install -y nginx)"
        )
    apt_install("nginx")
    found = find_nginx()
    if not found:
        raise RuntimeError("nginx was installed but its binary was not found")
    return found


def stream_vars(stream: int, socket: Path | None) -> dict[str, str]:
    """HERALD_STREAM_TARGET and HERALD_STREAM_SERVERS as nginx/entrypoint.sh renders them.

    `socket`: the stream worker's Unix socket (STREAM_TRANSPORT=unix: the
    upstream herald_streams, that one slot); None for tcp (its loopback port;
    the upstream, unused then, names the same port).
    """
    if socket is None:
        return {
            "HERALD_STREAM_TARGET": f"127.0.0.1:{stream}",
            "HERALD_STREAM_SERVERS": f"server 127.0.0.1:{stream};",
        }
    return {
        "HERALD_STREAM_TARGET": "herald_streams",
        "HERALD_STREAM_SERVERS": f"server unix:{socket} max_fails=1 fail_timeout=1s;",
    }


def render_server(
    template: str, *, listen: int, publisher: int, stream: int, prefix: Path, socket: Path | None = None
) -> str:
    """Herald's server block for loopback: what the nginx image's envsubst would produce.

    Only the variables compose.yaml passes are substituted (nginx's own $vars
    stay), with the stream target of the transport (`socket`, stream_vars), the
    service names become loopback host:port, the log and html paths point into
    the temporary prefix and the repository.
    """
    variables = {**NGINX_VARS, **stream_vars(stream, socket)}

    def substitute(match: re.Match[str]) -> str:
        return variables[match.group(1)]

    names = "|".join(variables)
    text = re.sub(r"\$\{(" + names + r")\}", substitute, template)
    replacements = {
        "publisher-service:8000": f"127.0.0.1:{publisher}",
        "listen 80 default_server;": f"listen 127.0.0.1:{listen} default_server backlog=4096;",
        "/var/log/nginx/access.log": str(prefix / "logs" / "access.log"),
        "root /usr/share/nginx/html;": f"root {HTML_ROOT};",
        # No variables in it: included as it stands.
        "/etc/nginx/conf.d/herald-error-cors.inc": str(ERROR_CORS),
    }
    for old, new in replacements.items():
        if old not in text:
            raise RuntimeError(f"the nginx template no longer contains {old!r}: update tests/load/stack.py")
        text = text.replace(old, new)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    leftover = re.findall(r"\$\{[A-Z_]+\}", code)
    if leftover:
        raise RuntimeError(f"the nginx template uses variables the bench does not set: {leftover}")
    return text


def temp_path_directives(temp: Path) -> str:
    """nginx's temporary directories inside the bench's prefix (lines of the http block)."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(f"    {kind}_temp_path {temp / kind};" for kind in kinds)


def render_main(prefix: Path, nofile: int) -> str:
    temp = prefix / "temp"
    paths = temp_path_directives(temp)
    mime = "/etc/nginx/mime.types" if Path("/etc/nginx/mime.types").exists() else "mime.types"
    return f"""# Generated by tests/load/stack.py for the bench.
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{
    worker_connections 65536;
}}
http {{
    include {mime};
    default_type application/octet-stream;
{paths}
    include {prefix / "conf" / "herald.conf"};
}}
"""


@dataclass
class Nginx:
    binary: str
    port: int
    prefix: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        return children(self.process.pid)

    def version(self) -> str:
        run = subprocess.run([self.binary, "-v"], capture_output=True, text=True, check=False)
        return (run.stderr or run.stdout).strip().split("/")[-1]

    def stop(self) -> None:
        stop_process(self.process, signal.SIGQUIT, timeout=10)


def start_nginx(
    binary: str, tmp: Path, *, publisher: int, stream: int, nofile: int, socket: Path | None = None
) -> Nginx:
    prefix = tmp / "nginx"
    for sub in ("conf", "logs", "temp"):
        (prefix / sub).mkdir(parents=True)
    # nginx's workers run as nobody when the master is root: let them in.
    for path in (tmp, prefix, prefix / "temp"):
        path.chmod(0o755)
    port = free_port()
    server = render_server(
        TEMPLATE.read_text(), listen=port, publisher=publisher, stream=stream, prefix=prefix, socket=socket
    )
    (prefix / "conf" / "herald.conf").write_text(server)
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(render_main(prefix, nofile))
    base = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]
    check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected the rendered configuration:\n{check.stderr}")
    with (prefix / "logs" / "stderr.log").open("wb") as log:
        process = subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT)
    nginx = Nginx(binary, port, prefix, process)
    try:
        wait_ready(nginx.url + "/healthz", process=process)
    except Exception:
        nginx.stop()
        raise
    return nginx


# -- the whole stack -----------------------------------------------------------------


@dataclass
class Stack:
    """Direct mode: Redis, the publisher, one stream worker and nginx, all on loopback."""

    tmp: Path
    redis: RedisServer
    publisher: Service
    stream: Service
    nginx: Nginx
    nofile: int
    transport: str = "unix"
    settings: dict[str, str] = field(default_factory=dict)
    mode: str = "direct"

    @property
    def stats(self) -> Address:
        return ("127.0.0.1", self.stream.port)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def heartbeat_seconds(self) -> float:
        return float(self.stream.env.get("HEARTBEAT_SECONDS", "15"))

    def routes(self, scenario: str) -> list[Route]:
        """Straight to the services; fan-out and publish also through nginx."""
        direct = Route(
            "direct",
            ("127.0.0.1", self.stream.port),
            ("127.0.0.1", self.publisher.port),
            via="straight to the services",
        )
        nginx = Route(
            "nginx",
            ("127.0.0.1", self.nginx.port),
            ("127.0.0.1", self.nginx.port),
            via=f"nginx (127.0.0.1:{self.nginx.port}), to the stream worker over {self.transport}",
        )
        return [direct, nginx] if scenario in ("fanout", "publish") else [direct]

    @functools.cached_property
    def pids(self) -> dict[str, list[int]]:
        """Host pids by component: the services' workers, nginx's workers, redis-server."""
        return {
            "stream": self.stream.worker_pids(),
            "publisher": self.publisher.worker_pids(),
            "nginx": self.nginx.worker_pids(),
            "redis": self.redis.pids(),
        }

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pids) for name, pids in self.pids.items()}

    def rss_kb(self) -> dict[str, int]:
        return {"stream": sum(rss_kb(pid) for pid in self.pids["stream"])}

    def counted(self, kind: Kind) -> tuple[str, ...]:
        """The issue's direct-mode targets judge the stream worker, or the publisher's workers."""
        return ("publisher",) if kind == "publish" else ("stream",)

    def worker_pids(self, service: str) -> list[int]:
        return self.pids[service]

    def stream_limit(self, route: Route) -> tuple[int, str] | None:
        return None

    def check(self) -> str | None:
        return None

    def stream_workers(self) -> list[int]:
        return self.stream.worker_pids()

    def publisher_workers(self) -> list[int]:
        return self.publisher.worker_pids()

    def headline(self) -> str:
        return (
            f"direct mode: publisher {len(self.pids['publisher'])} workers, stream 1 worker; "
            f"nginx {self.nginx.version()} to the stream worker over {self.transport}, "
            f"Redis {self.redis.version()}"
        )

    def describe(self) -> dict[str, object]:
        stream_workers = self.stream_workers()
        return {
            "mode": self.mode,
            "transport": self.transport,
            "redis": {"url": self.redis.url, "version": self.redis.version(), "network": self.redis.network},
            "nginx": {"version": self.nginx.version(), "url": self.nginx.url, "template_vars": NGINX_VARS},
            "publisher": {
                "url": self.publisher.url,
                "workers": len(self.publisher_workers()),
                "env": self.publisher.env,
            },
            "stream": {"url": self.stream.url, "workers": len(stream_workers), "env": self.stream.env},
            "open_files_limit": {
                "bench": self.nofile,
                "stream_worker": open_files_limit(stream_workers[0]) if stream_workers else -1,
                "nginx": open_files_limit(self.nginx.process.pid),
            },
        }

    def stop(self) -> None:
        for stop in (self.nginx.stop, self.stream.stop, self.publisher.stop, self.redis.stop):
            with contextlib.suppress(Exception):
                stop()


def start_stack(
    tmp: Path,
    *,
    redis_url: str | None,
    publisher_workers: int,
    max_connections: int,
    nofile: int,
    redis_fsync: str = "always",
    transport: str = "unix",
) -> Stack:
    """Redis, the publisher, one stream worker and nginx; stopped again if any part fails.

    `transport`: how nginx reaches the stream worker (TRANSPORTS, as STREAM_TRANSPORT).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    nginx_binary = ensure_nginx()
    # The worker claims slot 1 of its own socket directory (stream/slots.py).
    sockets = tmp / "stream-sockets"
    unix = transport == "unix"
    if unix:
        sockets.mkdir()
        sockets.chmod(0o755)  # nginx's workers (nobody, when the master is root) connect in it
    redis_server = RedisServer(redis_url) if redis_url else start_redis(tmp, redis_image(), redis_fsync)
    started: list[Service] = []
    try:
        if redis_url:
            _wait_redis(redis_url)
        publisher = start_service("publisher", redis_server.url, tmp, WEB_CONCURRENCY=str(publisher_workers))
        started.append(publisher)
        stream = start_service(
            "stream",
            redis_server.url,
            tmp,
            WEB_CONCURRENCY="1",
            MAX_CONNECTIONS=str(max_connections),
            STREAM_SOCKET_DIR=str(sockets) if unix else "",  # empty: no socket
            STREAM_SLOTS="1",
        )
        started.append(stream)
        socket = sockets / "stream-1.sock" if unix else None
        nginx = start_nginx(
            nginx_binary, tmp, publisher=publisher.port, stream=stream.port, nofile=nofile, socket=socket
        )
    except BaseException:
        for service in started:
            with contextlib.suppress(Exception):
                service.stop()
        redis_server.stop()
        raise
    stack = Stack(tmp, redis_server, publisher, stream, nginx, nofile, transport)
    try:
        deadline = time.monotonic() + 20
        while len(stack.publisher_workers()) < publisher_workers and time.monotonic() < deadline:
            time.sleep(0.1)
    except BaseException:
        stack.stop()
        raise
    return stack
