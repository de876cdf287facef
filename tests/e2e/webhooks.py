"""The webhook e2e tests' shared parts (test_webhooks.py, test_cluster_stack.py):
the stack's webhook settings, the receiver's directory (webhook_receiver.py
writes what arrived there and reads how to answer), and streams long enough to
be seen."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.e2e.support import Stack, iter_frames, until_live, wait_until

NEW_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
OLD_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
DELAY = 2.0  # WEBHOOK_VACATED_DELAY_SECONDS
TTL = 3.0  # PRESENCE_TTL_SECONDS, the shortest allowed
TIMEOUT = 2.0  # WEBHOOK_TIMEOUT_SECONDS
RETRY_WINDOW = 40.0  # WEBHOOK_RETRY_SECONDS: longer than the outage below
# Long enough for an empty spell to be a real transition: the delay, the
# presence write (within a second) and the sweep (every second), with room.
GAP = DELAY + 3.0
RECEIVER_FILE = "tests/e2e/compose.webhooks.yaml"


def webhook_settings(receiver_dir: Path) -> dict[str, str]:
    return {
        "WEBHOOK_URL": "http://webhook-receiver:9000/hook",
        # A rotation in progress: the new secret and the old one.
        "WEBHOOK_SECRET": f"{NEW_SECRET} {OLD_SECRET}",
        "WEBHOOK_VACATED_DELAY_SECONDS": str(DELAY),
        "PRESENCE_TTL_SECONDS": str(int(TTL)),
        "WEBHOOK_TIMEOUT_SECONDS": str(TIMEOUT),
        "WEBHOOK_LEASE_SECONDS": "5",
        "WEBHOOK_RETRY_SECONDS": str(RETRY_WINDOW),
        "WEBHOOK_BACKOFF_MAX_SECONDS": "1",
        "RECEIVER_DIR": str(receiver_dir),
    }


@dataclass
class Hooks:
    """The receiver's directory: what arrived, and how it answers."""

    directory: Path

    def answer(self, status: int = 204, delay: float = 0, retry_after: int | None = None) -> None:
        staged = self.directory / "mode.json.new"
        staged.write_text(json.dumps({"status": status, "delay": delay, "retry_after": retry_after}))
        os.replace(staged, self.directory / "mode.json")

    def records(self) -> list[dict[str, Any]]:
        path = self.directory / "received.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def on(self, channel: str) -> list[dict[str, Any]]:
        """Requests carrying events of `channel`, in arrival order."""
        return [r for r in self.records() if any(e["data"]["channel"] == channel for e in events_of(r))]

    def taken(self, channel: str) -> list[dict[str, Any]]:
        """The channel's events the receiver took (answered 2xx in time), each once,
        in the order they were first taken."""
        seen: dict[str, dict[str, Any]] = {}
        for r in self.on(channel):
            if 200 <= r["status"] < 300 and r["delay"] < TIMEOUT:
                for e in events_of(r):
                    seen.setdefault(e["id"], e)
        return list(seen.values())

    def kinds(self, channel: str) -> list[str]:
        return [e["type"].removeprefix("channel.") for e in self.taken(channel)]


def events_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    body = json.loads(record["body"])
    return list(body["data"]["events"]) if body["type"] == "batch" else [body]


def subscribe(stack: Stack, channel: str) -> requests.Response:
    """A stream through nginx, returned once it is live (subscribed)."""
    response = stack.open_stream([channel])
    assert response.status_code == 200, response.text
    frames = iter_frames(response, timeout=300)
    until_live(frames)
    # Kept with the response: a reader dropped half-way may take the connection with it.
    response.frames = frames  # type: ignore[attr-defined]
    return response


def visit(stack: Stack, channel: str) -> None:
    """A stream that stays long enough to be seen: presence is written once a second."""
    response = subscribe(stack, channel)
    time.sleep(1.5)
    response.close()


def wait_kinds(hooks: Hooks, channel: str, expected: list[str], timeout: float = 30) -> None:
    wait_until(
        lambda: hooks.kinds(channel) == expected,
        timeout,
        f"{channel}: {expected}, got {hooks.kinds(channel)}",
    )
