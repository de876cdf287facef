"""Run the real services (gunicorn + gevent) as subprocesses on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIRS = {"publisher": ROOT / "publisher-service", "stream": ROOT / "stream-service"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running gunicorn of one of the services."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the arbiter)."""
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(p) for p in out.stdout.split()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def wait_ready(url: str, timeout: float = 20, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200, on a monotonic deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s: {last}")


def start_service(
    kind: str, redis_url: str, tmp_dir: Path, *, ready: bool = True, port: int | None = None, **env: str
) -> Service:
    """Start one service with gunicorn and its own gunicorn.conf.py; wait until ready.

    With `ready=False` it only waits for /healthz (the process answers), not /readyz
    (Redis reachable): for tests of a service whose Redis is down.
    """
    port = port or free_port()
    log_path = tmp_dir / f"{kind}-{port}-{time.monotonic_ns()}.log"
    full_env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"],
            cwd=SERVICE_DIRS[kind],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(kind, port, process, log_path, env)
    try:
        wait_ready(service.url + ("/readyz" if ready else "/healthz"), process=process)
    except Exception:
        service.stop(signal.SIGKILL)
        raise RuntimeError(f"{kind} did not start:\n{service.log()}") from None
    return service


def eventually(condition: Callable[[], object], timeout: float = 10, interval: float = 0.05) -> bool:
    """Poll `condition` on a monotonic deadline; True as soon as it holds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
