"""Helpers of the end-to-end tests: the Compose stack, publishing, SSE clients.

Everything goes through nginx on the published port, the way a browser or a
backend would reach Herald. Waits are on time.monotonic() deadlines.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from tests.support.sse import Event, Frame, SSEParser, unwrap

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seq_of(event_id: str) -> int:
    """The sequence number of an event id `<epoch>-<seq>`."""
    return int(event_id.rsplit("-", 1)[1])


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # keep trying until the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def compose_command() -> list[str]:
    """How the tests run Compose: HERALD_E2E_COMPOSE, else scripts/compose-local.sh.

    compose-local.sh builds on air-gapped hosts like CI (local stand-in images,
    wheelhouses); on a host that can pull, HERALD_E2E_COMPOSE="docker compose"
    uses the official images.
    """
    configured = os.environ.get("HERALD_E2E_COMPOSE", "").strip()
    if configured:
        return shlex.split(configured)
    return [str(ROOT / "scripts" / "compose-local.sh")]


@dataclass
class Stack:
    """A running Compose project of Herald, reached through nginx."""

    project: str
    port: int
    env_file: Path
    token: str
    settings: dict[str, str]
    log_dir: Path
    files: tuple[str, ...] = ()  # compose files, when not just compose.yaml
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- Compose and Docker ---------------------------------------------------

    def compose(
        self, *args: str, timeout: float = 120, check: bool = True, prepare: bool = False
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if not prepare:
            env["HERALD_SKIP_PREPARE"] = "1"
        files = [arg for name in self.files for arg in ("-f", name)]
        command = [*compose_command(), "-p", self.project, "--env-file", str(self.env_file), *files, *args]
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def containers(self, service: str, *, running_only: bool = True) -> list[str]:
        """Container ids of one service of this project, sorted by name."""
        args = [
            "docker",
            "ps",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}} {{.ID}}",
        ]
        if not running_only:
            args.insert(2, "-a")
        out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=30).stdout
        return [line.split()[1] for line in sorted(out.splitlines()) if line.strip()]

    def docker(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"docker {shlex.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def container_ip(self, container: str) -> str:
        return self.docker(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container
        ).strip()

    def health(self, container: str) -> str:
        template = "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        return self.docker("inspect", "-f", template, container).strip()

    def established_streams(self, container: str) -> int:
        """Open connections to one stream replica, counted by the kernel, not the app:
        TCP connections to its port 8000 (from its /proc/net/tcp; STREAM_TRANSPORT=tcp,
        and health checks) plus nginx's connections to its Unix socket (the default).
        """
        text = self.docker("exec", container, "cat", "/proc/net/tcp")
        count = 0
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[1].endswith(":1F40") and parts[3] == "01":
                count += 1
        return count + self.unix_streams(container)

    def unix_streams(self, container: str) -> int:
        """nginx's open connections to a stream replica's Unix socket (stream/slots.py).

        The server end of a Unix connection belongs to the connecting side's network
        namespace, so it is listed in nginx's /proc/net/unix (state 03, connected),
        under the path of the replica's socket.
        """
        slot = json.loads(self.internal_get(container, "/stats"))["slot"]
        if slot is None:
            return 0
        path = f"/run/herald/stream-{slot}.sock"
        text = self.docker("exec", self.containers("nginx")[0], "cat", "/proc/net/unix")
        lines = text.splitlines()[1:]
        return sum(1 for line in lines if line.split()[5:6] == ["03"] and line.endswith(" " + path))

    def scale_streams(self, replicas: int, timeout: float = 120) -> list[str]:
        """Run `replicas` stream-service containers, all healthy; return their ids."""
        self.compose(
            "up", "-d", "--wait", "--no-build", "--scale", f"stream-service={replicas}", timeout=timeout
        )
        ids = self.containers("stream-service")
        assert len(ids) == replicas, ids
        return ids

    def wait_healthy(self, service: str, count: int, timeout: float = 60) -> list[str]:
        def ready() -> list[str] | None:
            ids = self.containers(service)
            if len(ids) == count and all(self.health(c) == "healthy" for c in ids):
                return ids
            return None

        result: list[str] = wait_until(ready, timeout, f"{count} healthy {service} container(s)", 0.25)
        return result

    def internal_get(self, container: str, path: str, timeout: float = 30) -> str:
        """GET an internal endpoint of a service (/metrics, /stats: nginx does not
        route them) from inside its container, with the image's own Python."""
        code = (
            "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:8000' + sys.argv[1], timeout=5).read().decode())"
        )
        return self.docker("exec", container, "python3", "-c", code, path, timeout=timeout)

    def redis_cli(self, *args: str, timeout: float = 30) -> str:
        """Run redis-cli inside this project's Redis container; its raw output."""
        return self.docker("exec", self.containers("redis")[0], "redis-cli", *args, timeout=timeout)

    def nginx_log(self) -> list[str]:
        result = self.compose("logs", "--no-color", "--no-log-prefix", "nginx", timeout=60)
        return result.stdout.splitlines()

    # --- HTTP -----------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def publish_raw(self, body: Any, token: str | None = "default", **kwargs: Any) -> requests.Response:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        token = self.token if token == "default" else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        return self.session.post(self.url("/publish"), data=data, headers=headers, timeout=10, **kwargs)

    def publish(self, channel: str, data: Any, event: str = "message") -> str:
        """Publish one event (retrying 429/502/503 briefly); return its id."""
        deadline = time.monotonic() + 15
        while True:
            answer = self.publish_raw({"channel": channel, "event": event, "data": data})
            if answer.status_code == 202:
                return str(answer.json()["id"])
            if answer.status_code not in (429, 502, 503, 504) or time.monotonic() > deadline:
                raise AssertionError(f"publish failed: {answer.status_code} {answer.text}")
            time.sleep(0.2)

    def open_stream(
        self,
        channels: Sequence[str],
        *,
        last_event_id: str | None = None,
        query_id: str | None = None,
        read_timeout: float = 15,
    ) -> requests.Response:
        params = [("channel", c) for c in channels]
        if query_id:
            params.append(("lastEventId", query_id))
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        return requests.get(
            self.url("/stream"), params=params, headers=headers, stream=True, timeout=(5, read_timeout)
        )


# --- reading streams (parsed by tests.support.sse) ---------------------------------


def bounded_chunks(response: requests.Response, deadline: float) -> Iterator[bytes]:
    """The body's chunks as they arrive, failing once `deadline` (monotonic) passed.

    Heartbeats alone never make a reader wait forever for a frame that does not come."""
    for chunk in response.iter_content(chunk_size=None):
        if time.monotonic() > deadline:
            raise AssertionError("stream: read past the deadline")
        yield chunk


def iter_frames(response: requests.Response, timeout: float = 30) -> Iterator[Frame]:
    """Frames of an SSE response as they arrive (comments, fields, data, arrival time).

    A multi-channel stream's events carry their channel around their data
    (docs/api.md): they are unwrapped, strictly, with `Event.channel` set."""
    parser = SSEParser()
    channels = parse_qs(urlsplit(response.url).query).get("channel", [])
    for chunk in bounded_chunks(response, time.monotonic() + timeout):
        for frame in parser.feed(chunk):
            if frame.event is not None:
                frame.event = unwrap(frame.event, channels)
            yield frame


def sse_events(response: requests.Response, timeout: float = 30) -> Iterator[Event]:
    """The events a browser would dispatch from this stream, within `timeout` seconds."""
    for frame in iter_frames(response, timeout):
        if frame.event is not None:
            yield frame.event


def until_live(frames: Iterator[Frame]) -> Frame:
    """Read the preamble (comment, `retry:`); the stream is subscribed by then.

    Returns the retry frame. A fresh stream's id-only position frame follows
    (a resumed stream has none), then events."""
    for frame in frames:
        if "retry" in frame.fields:
            return frame
    raise AssertionError("the stream ended before its preamble")


# --- a resuming client ----------------------------------------------------------


@dataclass
class Received:
    id: str
    event: str
    data: str
    at: float


class ResumingClient(threading.Thread):
    """Reads a stream like a browser would: on any end or error it reconnects
    with Last-Event-ID set to the last id it received (first connection:
    ?lastEventId=start_id). Stops after `expected`
    events, on stop(), or at `deadline` (monotonic)."""

    def __init__(
        self,
        stack: Stack,
        channels: Sequence[str],
        start_id: str,
        expected: int,
        deadline: float,
        name: str = "client",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.stack = stack
        self.channels = list(channels)
        self.start_id = start_id
        self.expected = expected
        self.deadline = deadline
        self.events: list[Received] = []
        self.connections = 0  # streams that answered 200
        self.refused: list[int] = []  # non-200 statuses seen
        self.errors: list[str] = []
        self.connected = threading.Event()
        self.ended_at: list[float] = []  # when a stream ended (reconnect needed)
        self.reopened_at: list[float] = []
        self._stopping = threading.Event()
        self._response: requests.Response | None = None

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            response.close()

    def done(self) -> bool:
        return len(self.events) >= self.expected

    def run(self) -> None:
        last: str | None = None
        while not self._stopping.is_set() and not self.done() and time.monotonic() < self.deadline:
            try:
                response = self.stack.open_stream(
                    self.channels,
                    last_event_id=last,
                    query_id=None if last else self.start_id,
                    read_timeout=10,
                )
            except requests.RequestException as exc:
                self.errors.append(repr(exc))
                time.sleep(0.2)
                continue
            self._response = response
            try:
                if response.status_code != 200:
                    self.refused.append(response.status_code)
                    time.sleep(0.2)
                    continue
                self.connections += 1
                if self.connections > 1:
                    self.reopened_at.append(time.monotonic())
                self.connected.set()
                for event in sse_events(response, self.deadline - time.monotonic()):
                    received = Received(event.id, event.event, event.data, time.monotonic())
                    self.events.append(received)
                    if event.id:
                        last = event.id
                    if self.done() or self._stopping.is_set():
                        break
            except requests.RequestException as exc:
                self.errors.append(repr(exc))
            except Exception as exc:  # a closed response while stopping, etc.
                if not self._stopping.is_set():
                    self.errors.append(repr(exc))
            finally:
                response.close()
                self._response = None
            if not self.done() and not self._stopping.is_set():
                self.ended_at.append(time.monotonic())
                if last is None:
                    last = self.start_id
                time.sleep(0.05)
