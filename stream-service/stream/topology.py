"""Where each partition lives: the one Redis server, or the cluster node that
owns the partition's hash slot (REDIS_MODE=cluster).

redis-py's cluster client is used for what it does well, routing commands by
key and following the cluster's topology; Pub/Sub connections are the hub's
own, one per node, opened where this module says a partition lives.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.connection import parse_url

from .config import Config
from .contract import meta_key

Address = tuple[str, int]


class Topology:
    """Commands client and partition placement for one worker."""

    def __init__(self, config: Config) -> None:
        self._config = config
        timeout = config.subscribe_timeout_seconds
        # Settings of every connection (credentials, TLS, db), taken from the URL.
        self._kwargs: dict[str, Any] = parse_url(config.redis_url)
        self._standalone: redis.Redis | None = None
        self._cluster: RedisCluster | None = None
        if config.redis_mode != "cluster":
            self._standalone = redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(
                    config.redis_url,
                    max_connections=config.redis_pool_size,
                    timeout=timeout,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                )
            )

    @property
    def clustered(self) -> bool:
        return self._config.redis_mode == "cluster"

    def client(self) -> redis.Redis | RedisCluster:
        """The client for commands (history reads, health): built on first use on a
        cluster, so that a worker starts even while the cluster is unreachable."""
        if self._standalone is not None:
            return self._standalone
        if self._cluster is None:
            timeout = self._config.subscribe_timeout_seconds
            self._cluster = RedisCluster.from_url(
                self._config.redis_url,
                # Per node: wait for a free connection, as on a single server.
                connection_pool_class=redis.BlockingConnectionPool,
                max_connections=self._config.redis_pool_size,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
        return self._cluster

    def owners(self, refresh: bool = False) -> dict[int, Address]:
        """The node address of every partition; `refresh` re-reads the cluster's slots first."""
        partitions = range(self._config.partitions)
        if self._standalone is not None:
            address = (str(self._kwargs.get("host", "localhost")), int(self._kwargs.get("port", 6379)))
            return dict.fromkeys(partitions, address)
        cluster = self.client()
        assert isinstance(cluster, RedisCluster)
        if refresh:
            cluster.nodes_manager.initialize()
        owners = {}
        for p in partitions:
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(meta_key(p)))
            owners[p] = (node.host, int(node.port))
        return owners

    def pubsub_pool(self, address: Address) -> redis.ConnectionPool:
        """A pool for Pub/Sub connections to the node at `address` (RESP2: messages as replies)."""
        kwargs = {**self._kwargs, "host": address[0], "port": address[1]}
        kwargs.update(
            protocol=2,
            socket_timeout=self._config.watchdog_seconds,
            socket_connect_timeout=self._config.subscribe_timeout_seconds,
        )
        return redis.ConnectionPool(**kwargs)
