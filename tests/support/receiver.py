"""A webhook receiver for the tests: a real HTTP server on a loopback port that
records every request (headers and raw body) and answers as the test says."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    at: float  # monotonic
    headers: dict[str, str]
    body: bytes
    wall: float = 0.0  # time.time(), for latencies against an event's timestamp
    status: int = 0  # how it was answered

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, Any]]:
        """The events it carried: one, or a batch's."""
        value = self.json()
        return list(value["data"]["events"]) if value["type"] == "batch" else [value]


# An answer: status, extra headers, and seconds to wait before answering.
Answer = tuple[int, dict[str, str], float]


@dataclass
class Receiver:
    """What arrived, and how the next requests are answered (`answer`, settable)."""

    port: int
    requests: list[Received] = field(default_factory=list)
    answer: Callable[[Received], Answer] = lambda r: (204, {}, 0.0)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def taken(self, prefix: str = "") -> list[Received]:
        """Requests whose events are all on channels starting with `prefix`."""
        with self.lock:
            found = list(self.requests)
        return [r for r in found if all(e["data"]["channel"].startswith(prefix) for e in r.events())]

    def events(self, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        """(webhook-id, event) of every event received on channels starting with `prefix`."""
        return [(r.id, e) for r in self.taken(prefix) for e in r.events()]


@contextmanager
def running_receiver() -> Iterator[Receiver]:
    receiver = Receiver(port=0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver's server

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            headers = {k.lower(): v for k, v in self.headers.items()}
            got = Received(time.monotonic(), headers, self.rfile.read(length), time.time())
            status, extra, delay = receiver.answer(got)
            got = dataclasses.replace(got, status=status)
            with receiver.lock:
                receiver.requests.append(got)
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                pass  # the dispatcher gave up waiting

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
