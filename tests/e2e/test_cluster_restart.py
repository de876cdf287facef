"""The Compose stack on a Redis Cluster survives its own restarts (issue 19):
`down` (volumes kept) then `up --wait` again, on a new network where every
node gets a new address; every node restarted at once (`compose restart`, then
stopped and started with one of their addresses taken, so that some come back
on a new one) while the services keep running; and `down`/`up` with a master's
volume lost. Each time the cluster re-forms with its data: every event
published before is in /history through nginx, a stream resumed from a
Last-Event-ID taken before gets exactly the events published after it (no gap,
no duplicate, no reset), and publishing works.

One stack for every scenario: a cluster stack costs a minute or two to start.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.cluster import FILES, NODES, cli, master_of
from tests.e2e.conftest import MEASUREMENTS, running_stack
from tests.e2e.support import ResumingClient, Stack, iter_frames, until_live, wait_until

CHANNELS = 6  # over 16 partitions: on every master, most likely
EVENTS_PER_CHANNEL = 3


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("herald-cluster-restart"), files=FILES) as stack:
        yield stack


def addresses(stack: Stack) -> dict[str, str]:
    """Every node's current address on the project's network."""
    return {node: stack.container_ip(stack.containers(node)[0]) for node in NODES}


def cluster_ok(stack: Stack) -> bool:
    """Every node says cluster_state:ok and sees the five others at their
    current addresses, connected."""
    now = addresses(stack)
    for node in NODES:
        if "cluster_state:ok" not in cli(stack, node, "CLUSTER", "INFO"):
            return False
        view = cli(stack, node, "CLUSTER", "NODES").splitlines()
        for peer in NODES:
            if peer == node:
                continue
            if not any(
                f" {now[peer]}:6379@" in f" {line}"
                and line.split()[7] == "connected"
                and not {"fail", "fail?", "handshake", "noaddr"} & set(line.split()[2].split(","))
                for line in view
            ):
                return False
    return True


def publish_all(stack: Stack, channels: list[str], tag: str) -> list[tuple[str, str, int]]:
    """EVENTS_PER_CHANNEL events on each channel, one at a time, each retried
    with its Idempotency-Key while the cluster settles (a 503 redis_timeout may
    have stored it: the key makes the retry store it once); returns
    (channel, id, n) of each."""
    sent = []
    for n in range(EVENTS_PER_CHANNEL):
        for channel in channels:
            body = {"channel": channel, "event": "m", "data": {"c": channel, "n": n, "tag": tag}}
            key = secrets.token_hex(8)
            deadline = time.monotonic() + 60
            while True:
                answer = stack.publish_raw(body, headers={"Idempotency-Key": key})
                if answer.status_code == 202:
                    break
                assert answer.status_code in (429, 502, 503, 504), answer.text  # never a 500
                assert time.monotonic() < deadline, f"publishing did not come back: {answer.text}"
                time.sleep(0.25)
            sent.append((channel, str(answer.json()["id"]), n))
    return sent


def history(stack: Stack, channel: str) -> list[tuple[str, str, int]]:
    """The channel's history through nginx: (channel, id, n) of each event."""

    def fetch() -> dict[str, object] | None:
        answer = stack.session.get(
            stack.url("/history"), params={"channel": channel, "limit": "1000"}, timeout=10
        )
        return answer.json() if answer.status_code == 200 else None

    body = wait_until(fetch, 60, f"/history of {channel}", 0.25)
    assert body["reset"] is None, body
    return [(e["channel"], e["id"], e["data"]["n"]) for e in body["events"]]


def stream_position(stack: Stack, channels: list[str]) -> tuple[str, list[tuple[str, str, int]]]:
    """Open a stream, publish a round of events, read them: the Last-Event-ID
    after them (a vector over the channels' partitions) and what was sent."""
    response = stack.open_stream(channels)
    frames = iter_frames(response, timeout=30)
    until_live(frames)
    sent = publish_all(stack, channels, "before")
    got = 0
    last = ""
    for frame in frames:
        if frame.event is not None and frame.event.event == "m":
            got += 1
            last = frame.event.id
            if got == len(sent):
                break
    response.close()
    assert got == len(sent) and last
    return last, sent


def check_resumed(client: ResumingClient, after: list[tuple[str, str, int]]) -> None:
    """The client got exactly `after`: no reset, no gap, no duplicate, nothing
    from before, in order per channel."""
    deadline = time.monotonic() + 60
    while not client.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    client.stop()
    assert client.done(), (
        f"{client.name}: {len(client.events)} of {len(after)} events after the restart, "
        f"{client.connections} streams, refused {client.refused}, errors {client.errors[-3:]}"
    )
    assert not [e for e in client.events if e.event == "reset"], "a reset: the position was lost"
    got = [(json.loads(e.data), e.id) for e in client.events]
    assert all(data["tag"] == "after" for data, _ in got), "an event from before"
    assert sorted((d["c"], d["n"]) for d, _ in got) == sorted((c, n) for c, _, n in after), (
        "a gap or a duplicate"
    )
    own_id = {(c, n): i for c, i, n in after}
    for data, vector in got:
        # A multi-channel stream's id is a vector, `<partition>.<epoch>-<seq>` per
        # partition: the event's own id is its partition's component.
        assert own_id[(data["c"], data["n"])] in {part.split(".", 1)[1] for part in vector.split("_")}
    for channel in {c for c, _, _ in after}:
        ns = [d["n"] for d, _ in got if d["c"] == channel]
        assert ns == sorted(ns)


def survives(stack: Stack, restart: Callable[[list[str]], object], name: str, live_client: bool) -> None:
    """Events before, `restart(channels)`, then history, resume and publishing checked.
    With `live_client`, the resuming client is connected across the restart
    (the services keep running and must follow the cluster)."""
    channels = [f"e2e.restart.{secrets.token_hex(4)}.{i}" for i in range(CHANNELS)]
    last, before = stream_position(stack, channels)
    expected = CHANNELS * EVENTS_PER_CHANNEL
    client = ResumingClient(stack, channels, last, expected, deadline=time.monotonic() + 240, name=name)
    if live_client:
        client.start()
        assert client.connected.wait(15)
    old = addresses(stack)
    started = time.monotonic()
    restart(channels)
    wait_until(lambda: cluster_ok(stack), 90, "every node ok, seeing every other one", 0.5)
    MEASUREMENTS[f"{name}: cluster ok again after, s"] = round(time.monotonic() - started, 1)
    new = addresses(stack)
    MEASUREMENTS[f"{name}: nodes on a new address"] = sum(old[n] != new[n] for n in NODES)
    after = publish_all(stack, channels, "after")
    MEASUREMENTS[f"{name}: publishing again after, s"] = round(time.monotonic() - started, 1)
    for channel in channels:
        # Everything from before the restart, then what was published since, in order.
        assert history(stack, channel) == [e for e in before + after if e[0] == channel], channel
    if not live_client:
        client.start()
    check_resumed(client, after)
    assert stack.wait_healthy("stream-service", 1) and stack.wait_healthy("publisher-service", 1)


def test_down_and_up_again_keeps_the_cluster_and_its_events(cluster_stack: Stack) -> None:
    """The user's three commands: up (the fixture), down without -v, up --wait."""
    stack = cluster_stack

    def down_up(_: list[str]) -> None:
        stack.compose("down", "--timeout", "10", timeout=180)
        assert not stack.containers("redis", running_only=False)
        stack.compose("up", "-d", "--wait", timeout=300)

    survives(stack, down_up, "down/up", live_client=False)


def test_every_node_restarted_at_once_some_on_a_new_address(cluster_stack: Stack) -> None:
    """`compose restart` of the six nodes while streams are open; then all six
    stopped together and started again with one of their addresses taken by
    another container, so that at least one comes back on a new address."""
    stack = cluster_stack
    survives(stack, lambda _: stack.compose("restart", *NODES, timeout=120), "restart", live_client=True)

    network = stack.docker(
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}",
        stack.containers("redis")[0],
    ).strip()
    placeholder = f"{stack.project}-address-holder"
    old: dict[str, str] = {}

    def stop_hold_start(_: list[str]) -> None:
        old.update(addresses(stack))
        stack.compose("stop", "--timeout", "10", *NODES, timeout=120)
        image = stack.docker(
            "inspect", "-f", "{{.Config.Image}}", stack.containers("redis", running_only=False)[0]
        )
        stack.docker(
            "run",
            "-d",
            "--rm",
            "--name",
            placeholder,
            "--network",
            network,
            "--label",
            f"com.docker.compose.project={stack.project}",
            "--user",
            "redis",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--entrypoint",
            "sleep",
            image.strip(),
            "600",
        )
        stack.compose("start", *NODES, timeout=120)

    try:
        survives(stack, stop_hold_start, "stop/start, an address taken", live_client=True)
        new = addresses(stack)
        assert any(old[n] != new[n] for n in NODES), (old, new)
    finally:
        subprocess.run(["docker", "rm", "-f", placeholder], capture_output=True, check=False, timeout=60)


def test_a_master_whose_volume_was_lost_comes_back_as_a_replica(cluster_stack: Stack) -> None:
    """`down`, a master's volume deleted, `up --wait`: its replica, which holds
    the only copy of its slots, takes over instead of syncing from the empty
    node, and the empty node joins as a replica. Nothing acknowledged is lost."""
    stack = cluster_stack
    lost: dict[str, str] = {}

    def down_lose_a_master_up(channels: list[str]) -> None:
        master = master_of(stack, channels[0])  # so that events of this test were on it
        # Every write on that master acknowledged by its replica before it goes.
        assert cli(stack, master, "WAIT", "1", "5000").strip() == "1"
        container = stack.containers(master)[0]
        volume = stack.docker(
            "inspect",
            "-f",
            '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}',
            container,
        ).strip()
        assert volume.startswith(stack.project), volume
        lost.update(master=master, id=cli(stack, master, "CLUSTER", "MYID").strip())
        stack.compose("down", "--timeout", "10", timeout=180)
        stack.docker("volume", "rm", volume)
        stack.compose("up", "-d", "--wait", timeout=300)

    survives(stack, down_lose_a_master_up, "a master's volume lost", live_client=False)
    assert cli(stack, lost["master"], "ROLE").split()[0] == "slave"
    assert cli(stack, lost["master"], "CLUSTER", "MYID").strip() != lost["id"]
    for node in NODES:  # the lost node's old entry is forgotten everywhere
        assert lost["id"] not in cli(stack, node, "CLUSTER", "NODES")
