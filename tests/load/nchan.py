"""The bench's reference for fan-out: nchan (nginx's pub/sub module) on loopback, backed by Redis.

Herald's fan-out figures mean more next to those of a well-known C
implementation of the same job on the same machine in the same minutes. The
reference is Debian's nginx with libnginx-mod-nchan (installed when missing
and the bench runs as root, like tests.load.stack.ensure_nginx installs
nginx), run as a child process with a temporary prefix and ONE worker process
(`worker_processes 1`, as Herald's one stream worker), configured as:

- `upstream` with `nchan_redis_server` and `nchan_redis_pass` (nchan 1.3's
  form of `nchan_redis_url` + `nchan_use_redis on`, which it logs as
  deprecated), in nchan's default "distributed" storage mode: every message
  goes through Redis and is stored there, as Herald's events are; keys under
  their own namespace (`nchan_redis_namespace`), removed after the run;
- POST /pub/<channel>: `nchan_publisher` (answers 201, or 202 without subscribers);
- GET /sub/<channel>: `nchan_subscriber eventsource`, starting at the next
  message (`nchan_subscriber_first_message newest`, as a Herald stream without
  Last-Event-ID);
- GET /nchan_status: `nchan_stub_status` (subscribers, published messages).

nginx answers before nchan has reached Redis (subscribers get 503 meanwhile):
start_nchan waits for a probe publish to go through. And nchan greets a
subscriber (`: hi`) before its worker's SUBSCRIBE to the channel in Redis has
gone through, so a message published at once is lost to it: the bench
(tests.load.bench.NchanBench) waits for that subscription (PUBSUB NUMSUB)
before publishing, as a Herald stream is live only once subscribed.

Redis: the bench's own in direct mode (the same one Herald uses); in compose
mode a Redis started for the reference: Debian's redis-server as a child
process on a free loopback port when installed (its CPU then read from /proc),
else tests.load.stack.start_redis with the local image. Either way with the
same appendfsync as the bench's Redis (--redis-fsync, default always, as
compose.yaml's).

CPU: nchan's nginx master and worker, from /proc, is what the reference's
"CPU per delivery" counts (nchan does the publishing, the fan-out and the
HTTP in that one process); its Redis is shown apart when measurable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.load.stack import (
    Address,
    Kind,
    RedisServer,
    Route,
    _wait_redis,
    apt_install,
    children,
    cpu_seconds,
    ensure_nginx,
    open_files_limit,
    redis_image,
    rss_kb,
    start_redis,
    stop_process,
    temp_path_directives,
)
from tests.support.services import free_port, wait_ready

PACKAGE = "libnginx-mod-nchan"
MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_nchan_module.so",
    "/usr/share/nginx/modules/ngx_nchan_module.so",
    "/usr/local/nginx/modules/ngx_nchan_module.so",
)
REDIS_SERVER_CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def find_module() -> Path | None:
    return next((Path(c) for c in MODULE_CANDIDATES if Path(c).exists()), None)


def ensure_nchan() -> tuple[str, Path]:
    """nginx and the nchan module; installs Debian's package when missing and running as root."""
    binary = ensure_nginx()
    module = find_module()
    if module is not None:
        return binary, module
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            f"the nchan reference needs nginx's nchan module: sudo apt-get install -y {PACKAGE} "
            "(or run the bench with --no-reference)"
        )
    apt_install(PACKAGE)
    module = find_module()
    if module is None:
        raise RuntimeError(f"{PACKAGE} was installed but ngx_nchan_module.so was not found")
    return binary, module


# -- a Redis of the reference's own (compose mode) ---------------------------------------


@dataclass
class LocalRedis:
    """Debian's redis-server as a child process on a loopback port."""

    url: str
    process: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        return [self.process.pid] if self.process.poll() is None else []

    def stop(self) -> None:
        stop_process(self.process, signal.SIGTERM, timeout=10)


def start_reference_redis(tmp: Path, fsync: str) -> LocalRedis | RedisServer:
    """A Redis for the reference: redis-server if installed, else the local Docker image."""
    binary = shutil.which("redis-server") or next(
        (c for c in REDIS_SERVER_CANDIDATES if os.access(c, os.X_OK)), None
    )
    if binary is None:
        return start_redis(tmp, redis_image(), fsync)
    data = tmp / "redis-data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no"]
    command += ["--appendonly", "yes", "--appendfsync", fsync, "--dir", str(data), "--save", ""]
    command += ["--daemonize", "no"]
    with (tmp / "redis.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = LocalRedis(f"redis://127.0.0.1:{port}/0", process)
    try:
        _wait_redis(server.url)
    except BaseException:
        server.stop()
        raise
    return server


# -- nchan's nginx -------------------------------------------------------------------------


def render_conf(*, module: Path, prefix: Path, port: int, redis_url: str, namespace: str, nofile: int) -> str:
    """nginx.conf of the reference: one worker, nchan over Redis (see the module's docstring)."""
    temp = prefix / "temp"
    paths = temp_path_directives(temp)
    common = f"""nchan_channel_id $1;
            nchan_redis_pass herald_bench_redis;
            nchan_redis_namespace {namespace};"""
    return f"""# Generated by tests/load/nchan.py: the bench's fan-out reference.
load_module {module};
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{
    worker_connections {nofile};
}}
http {{
    default_type application/octet-stream;
    access_log {prefix / "logs" / "access.log"};
    tcp_nodelay on;
{paths}
    upstream herald_bench_redis {{
        nchan_redis_server {redis_url};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/pub/([^/]+)$ {{
            nchan_publisher;
            {common}
            # Kept for replay, as Herald keeps its history (HISTORY_MAXLEN).
            nchan_message_buffer_length 1000;
            nchan_message_timeout 10m;
        }}
        location ~ ^/sub/([^/]+)$ {{
            nchan_subscriber eventsource;
            {common}
            nchan_subscriber_first_message newest;
        }}
        location = /nchan_status {{
            access_log off;  # polled while streams open and close, like Herald's /stats
            nchan_stub_status;
        }}
        location = /healthz {{
            access_log off;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def parse_status(text: str) -> dict[str, str]:
    """nchan_stub_status's "name: value" lines."""
    found = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip()] = value.strip()
    return found


@dataclass
class NchanStack:
    """nginx + nchan on loopback with its Redis; implements tests.load.stack.BenchStack."""

    binary: str
    module: Path
    prefix: Path
    port: int
    process: subprocess.Popen[bytes]
    redis: LocalRedis | RedisServer
    owns_redis: bool
    namespace: str
    nofile: int
    mode: str = "nchan"
    status: dict[str, str] = field(default_factory=dict)

    # -- BenchStack ------------------------------------------------------------------------

    @property
    def stats(self) -> Address:
        return ("127.0.0.1", self.port)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def heartbeat_seconds(self) -> float:
        return 0.0  # nchan_eventsource_ping_interval: off by default

    @property
    def route(self) -> Route:
        address = ("127.0.0.1", self.port)
        return Route("nchan", address, address, via=f"nchan's nginx, 127.0.0.1:{self.port}, one worker")

    def routes(self, scenario: str) -> list[Route]:
        return [self.route]

    def nginx_pids(self) -> list[int]:
        return [self.process.pid, *children(self.process.pid)]

    def cpu(self) -> dict[str, float]:
        figures = {"nginx": cpu_seconds(self.nginx_pids())}
        redis_pids = self.redis.pids()
        if redis_pids:
            figures["redis"] = cpu_seconds(redis_pids)
        return figures

    def rss_kb(self) -> dict[str, int]:
        total = 0
        for pid in self.nginx_pids():
            with contextlib.suppress(OSError, RuntimeError):
                total += rss_kb(pid)
        return {"nginx": total}

    def counted(self, kind: Kind) -> tuple[str, ...]:
        """nchan's nginx, master and worker: it publishes, fans out and speaks HTTP."""
        return ("nginx",)

    def worker_pids(self, service: str) -> list[int]:
        return children(self.process.pid) if service == "nginx" else []

    def stream_limit(self, route: Route) -> tuple[int, str] | None:
        return None

    def check(self) -> str | None:
        if self.process.poll() is not None:
            return f"nchan's nginx exited ({self.process.returncode}); see {self.prefix / 'logs'}"
        return None

    def version(self) -> str:
        run = subprocess.run([self.binary, "-v"], capture_output=True, text=True, check=False)
        nginx = (run.stderr or run.stdout).strip().split("/")[-1]
        return f"nginx {nginx}, nchan {self.status.get('nchan version', '?')}"

    def redis_version(self) -> str:
        client = redis.Redis.from_url(self.redis.url)
        try:
            return str(client.info("server").get("redis_version", "?"))
        except redis.RedisError:
            return "?"
        finally:
            client.close()

    def headline(self) -> str:
        where = "its own Redis" if self.owns_redis else "the bench's Redis"
        return f"nchan reference: {self.version()}, one worker, {where} {self.redis_version()}"

    def describe(self) -> dict[str, object]:
        workers = children(self.process.pid)
        return {
            "mode": self.mode,
            "version": self.version(),
            "module": str(self.module),
            "url": f"http://127.0.0.1:{self.port}",
            "workers": len(workers),
            "redis": {
                "url": self.redis.url,
                "version": self.redis_version(),
                "own": self.owns_redis,
                "kind": "redis-server"
                if isinstance(self.redis, LocalRedis)
                else "docker"
                if self.redis.container
                else "the bench's",
                "namespace": self.namespace,
            },
            "open_files_limit": open_files_limit(workers[0]) if workers else -1,
        }

    def cleanup_redis(self) -> None:
        """Remove the reference's keys (its namespace) from Redis."""
        client = redis.Redis.from_url(self.redis.url)
        try:
            keys = list(client.scan_iter(f"{self.namespace}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
        finally:
            client.close()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            stop_process(self.process, signal.SIGQUIT, timeout=10)
        if self.owns_redis:
            with contextlib.suppress(Exception):
                self.redis.stop()


def start_nchan(tmp: Path, *, redis_url: str | None, fsync: str, nofile: int, namespace: str) -> NchanStack:
    """nginx + nchan in `tmp`, on the Redis at `redis_url` (None: a Redis of its own); up and ready."""
    binary, module = ensure_nchan()
    prefix = tmp / "nchan"
    for sub in ("conf", "logs", "temp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    # nginx's workers run as nobody when the master is root: let them in.
    for path in (tmp, prefix, prefix / "temp"):
        path.chmod(0o755)
    owned = redis_url is None
    server: LocalRedis | RedisServer = (
        start_reference_redis(prefix, fsync) if redis_url is None else RedisServer(redis_url)
    )
    try:
        port = free_port()
        conf = prefix / "conf" / "nginx.conf"
        conf.write_text(
            render_conf(
                module=module,
                prefix=prefix,
                port=port,
                redis_url=server.url,
                namespace=namespace,
                nofile=nofile,
            )
        )
        base = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected the nchan configuration:\n{check.stderr}")
        with (prefix / "logs" / "stderr.log").open("wb") as log:
            process = subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT)
    except BaseException:
        if owned:
            server.stop()
        raise
    stack = NchanStack(binary, module, prefix, port, process, server, owned, namespace, nofile)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", process=process)
        wait_redis_ready(port, process)
    except BaseException:
        stack.stop()
        raise
    return stack


def wait_redis_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until nchan's worker has connected to Redis and a publish goes through.

    nginx answers at once, but nchan connects to Redis (and loads its scripts)
    after the worker starts; meanwhile it answers subscribers 503.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nchan's nginx exited ({process.returncode})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/nchan_status", timeout=2) as answer:
                status = parse_status(answer.read().decode(errors="replace"))
            last = f"redis connected servers: {status.get('redis connected servers')}"
            if int(status.get("redis connected servers", "0")) >= 1:
                probe = urllib.request.Request(f"http://127.0.0.1:{port}/pub/bench.probe", data=b"probe")
                with urllib.request.urlopen(probe, timeout=2) as answer:
                    if answer.status in (201, 202):
                        return
                    last = f"a probe publish answered {answer.status}"
        except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"nchan did not reach Redis in {timeout} s: {last}")
