"""A webhook receiver for the e2e tests, run as a container on the stack's
network (tests/e2e/compose.webhooks.yaml), standard library only.

It appends every request (headers, raw body, and how it was answered) to
/data/received.jsonl, synced to disk before it answers, and answers as
/data/mode.json says at that moment: {"status": 204, "delay": 0,
"retry_after": null}. /data is a directory of the test's, bind-mounted, so the
test reads what arrived and changes the answers without a port of its own, and
the record survives the receiver being killed and started again.
"""

from __future__ import annotations

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DATA = os.environ.get("RECEIVER_DATA", "/data")
PORT = int(os.environ.get("RECEIVER_PORT", "9000"))


def mode() -> dict[str, Any]:
    try:
        with open(os.path.join(DATA, "mode.json")) as f:
            value = json.load(f)
    except (OSError, ValueError):
        value = {}
    return {"status": 204, "delay": 0, "retry_after": None, **value}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        answer = mode()
        record = {
            "at": time.time(),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
            "status": answer["status"],
            "delay": answer["delay"],
        }
        with open(os.path.join(DATA, "received.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if answer["delay"]:
            time.sleep(float(answer["delay"]))
        try:
            self.send_response(int(answer["status"]))
            if answer["retry_after"] is not None:
                self.send_header("Retry-After", str(answer["retry_after"]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass  # the dispatcher stopped waiting

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    server.daemon_threads = True
    server.serve_forever()
