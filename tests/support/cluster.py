"""A real Redis Cluster for the tests: 3 masters with a replica each, in one container.

Six `redis-server` processes on ports 7000-7005 announce the container's own
address, so that clients on the host (redis-py's cluster client, the services)
follow MOVED redirections and the cluster's topology to the nodes themselves.
A failover is a killed master: its replica takes over after `NODE_TIMEOUT_MS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

PORTS = tuple(range(7000, 7006))
NODE_TIMEOUT_MS = 2000

# One node, started in its own directory under the working directory (/data);
# `$port` and `$ip` are set by the caller. nodes.conf stays there, so a killed
# node started again rejoins the cluster (as a replica of whoever took over).
NODE = f"""
mkdir -p "$port"
redis-server --port "$port" --dir "$PWD/$port" --daemonize yes \\
  --pidfile "$PWD/$port/redis.pid" --logfile "$PWD/$port/log" \\
  --bind 0.0.0.0 --protected-mode no --save '' --appendonly no \\
  --cluster-enabled yes --cluster-config-file nodes.conf \\
  --cluster-node-timeout {NODE_TIMEOUT_MS} --cluster-announce-ip "$ip"
"""

# Runs as the image's own user, in its working directory (/data).
START = f"""
set -e
ip=$(hostname -i | cut -d' ' -f1)
for port in {" ".join(map(str, PORTS))}; do
{NODE}
done
for port in {" ".join(map(str, PORTS))}; do
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
done
redis-cli --cluster create {" ".join(f'"$ip:{p}"' for p in PORTS)} --cluster-replicas 1 --cluster-yes
echo cluster-created
exec sleep infinity
"""


@dataclass
class Cluster:
    """A running cluster: where it is, and ways to hurt it."""

    container: Any
    host: str

    @property
    def url(self) -> str:
        """A seed node's URL (any node leads to the others)."""
        return f"redis://{self.host}:{PORTS[0]}/0"

    def client(self) -> RedisCluster:
        """redis-py's cluster client, seeded with every node (some may be down)."""
        return RedisCluster(startup_nodes=[ClusterNode(self.host, p) for p in PORTS], socket_timeout=5)

    def _node(self, port: int) -> redis.Redis:
        """A client of one node that fails at once (redis-py retries with backoff by default)."""
        return redis.Redis(host=self.host, port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0))

    def nodes(self) -> dict[str, Any]:
        """`CLUSTER NODES` as a live node sees it."""
        last: Exception | None = None
        for port in PORTS:
            try:
                return self._node(port).cluster("nodes")  # type: ignore[no-any-return]
            except redis.RedisError as exc:
                last = exc
        raise redis.ConnectionError(f"no node of the cluster answers: {last}")

    def masters(self) -> list[int]:
        """The ports of the live masters."""
        return sorted(_port(a) for a, n in self.nodes().items() if _is(n, "master"))

    def replicas(self) -> list[int]:
        """The ports of the live replicas."""
        return sorted(_port(a) for a, n in self.nodes().items() if _is(n, "slave"))

    def kill(self, port: int) -> None:
        """Crash one node: SIGKILL, nothing saved, no goodbye to its replica."""
        self.container.exec(["sh", "-c", f"kill -9 $(cat {port}/redis.pid)"])

    def revive(self, port: int) -> None:
        """Start a killed node again: it rejoins as a replica of the node that took over."""
        script = f"ip=$(hostname -i | cut -d' ' -f1); port={port}; {NODE}"
        self.container.exec(["sh", "-c", script])

    def node_id(self, port: int) -> str:
        node_id = self._node(port).cluster("myid")
        return node_id.decode() if isinstance(node_id, bytes) else str(node_id)

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`."""
        for port in self.masters():
            for start, end, master, *_ in self._node(port).execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(f"no master serves slot {slot}")

    def migrate(self, slot: int, to_port: int, batch: int = 10) -> int:
        """Move `slot` to the master at `to_port`, the way `redis-cli --cluster reshard`
        does: IMPORTING/MIGRATING, MIGRATE its keys in batches, then SETSLOT NODE
        on both and every other master. Returns how many keys moved."""
        from_port = self.owner(slot)
        source, target = self._node(from_port), self._node(to_port)
        source_id, target_id = self.node_id(from_port), self.node_id(to_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            source.execute_command("MIGRATE", self.host, to_port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for port in self.masters():
            if port not in (from_port, to_port):
                self._node(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def _synced(self) -> bool:
        """Every replica's link to its master is up (a replica still in its first
        sync cannot take over: it has never been in step)."""
        for port in self.replicas():
            status = self._node(port).info("replication")
            if status.get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, masters: int = 3, replicas: int = 3, timeout: float = 30.0) -> None:
        """Wait until every slot is served and the cluster has the given shape."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                info = self._node(self.masters()[0]).cluster("info")
                shape = (len(self.masters()), len(self.replicas()))
            except (redis.RedisError, IndexError) as exc:
                last = repr(exc)
            else:
                if info.get("cluster_state") == "ok" and shape == (masters, replicas) and self._synced():
                    return
                last = f"cluster_state {info.get('cluster_state')}, masters/replicas {shape}"
            time.sleep(0.1)
        raise TimeoutError(f"the Redis Cluster did not become healthy in {timeout} s: {last}")


def _port(address: str) -> int:
    return int(address.split("@")[0].rsplit(":", 1)[1])


def _is(node: dict[str, Any], role: str) -> bool:
    return role in node["flags"] and "fail" not in node["flags"] and node.get("connected", True)


@contextmanager
def running_cluster(image: str, timeout: float = 60.0) -> Iterator[Cluster]:
    """Start the cluster in a container, wait until it serves every slot, remove it after."""
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(image).with_command(["sh", "-c", START])
    with container:
        deadline = time.monotonic() + timeout
        wrapped = container.get_wrapped_container()
        while b"cluster-created" not in wrapped.logs():
            wrapped.reload()
            if wrapped.status != "running" or time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not start:\n" + wrapped.logs().decode()[-2000:])
            time.sleep(0.2)
        wrapped.reload()
        host = wrapped.attrs["NetworkSettings"]["IPAddress"]
        cluster = Cluster(container, host)
        cluster.wait_healthy(timeout=max(1.0, deadline - time.monotonic()))
        yield cluster
