"""Which Redis server holds a key, and commands sent there over connections of
the publisher's own, with the retry rules: in effect a small Redis Cluster
client, kept for its CPU cost (docs/publisher-service.md, "Cluster routing").

Commands go straight through redis-py's `Connection` (hiredis parses the reply):
a publish is one EVALSHA per partition, and this path skips what the client
adds to each command (pool checkout with a readiness poll, retry wrappers,
observability hooks), which cost more CPU than the command itself. The rules
stay the client's (`make_redis`): a broken connection is reconnected and the
command retried once, a timeout never is (the script may have run), and a
connection that failed in any way is closed before it is used again. In a
cluster, a MOVED or ASK redirection (the command did not run) and a failover
in progress (CLUSTERDOWN, TRYAGAIN, a node gone) are retried too, after the
slots are learnt again: at most 3 tries within REDIS_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import redis
import redis.connection
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException, TryAgainError
from redis.retry import Retry

from .config import Config

Connection = redis.connection.ConnectionInterface
T = TypeVar("T")
# What to run on the connection the router picked: (connection, asking) -> reply,
# where `asking` says the slot is being migrated and the command goes after ASKING.
Step = Callable[[Connection, bool], T]


def call(conn: Connection, asking: bool, command: tuple[Any, ...]) -> Any:
    """Send one command on `conn` and read its reply; ASKING first after an ASK redirection."""
    if asking:
        # ASKING lets the next command (only that one) run on the slot's target.
        conn.send_command("ASKING")
        conn.read_response()
    conn.send_command(*command)
    return conn.read_response()


def command(*args: str | int) -> Step[Any]:
    """The step that sends one command (not a script)."""

    def run(conn: Connection, asking: bool) -> Any:
        return call(conn, asking, args)

    return run


class Topology(Protocol):
    """Which Redis server holds a key, and new connections to it."""

    # Tries of one partition's command: on a broken connection, and in a
    # cluster on a redirection or during a failover.
    attempts: int
    cluster: bool

    def address(self, key: str) -> str:
        """The server holding `key` (its primary)."""

    def connection(self, address: str) -> Connection:
        """A new connection to that server (connected on first use)."""

    def refresh(self) -> None:
        """Learn the cluster's slots again (after a redirection or a lost node)."""


class Standalone:
    """One Redis server: every key lives there."""

    attempts = 2  # one reconnect, on a broken connection only
    cluster = False

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def address(self, key: str) -> str:
        return ""

    def connection(self, address: str) -> Connection:
        return self._client.connection_pool.make_connection()

    def refresh(self) -> None:
        pass


class Cluster:
    """A Redis Cluster. redis-py's cluster client is used for its map of slots to
    nodes only; commands go over the router's own connections to each node.

    The client is made on first use, so that the service starts (and answers
    /healthz) while the cluster is unreachable.
    """

    attempts = 3
    cluster = True

    def __init__(self, url: str, timeout_seconds: float) -> None:
        redis.connection.parse_url(url)  # a malformed URL fails now, as for one server
        self._url = url
        self._timeout = timeout_seconds
        self._client: redis.RedisCluster | None = None

    def _topology(self) -> redis.RedisCluster:
        if self._client is None:
            try:
                self._client = redis.RedisCluster.from_url(
                    self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
                )
            except RedisClusterException as exc:
                raise redis.ConnectionError(f"the Redis Cluster cannot be reached: {exc}") from exc
        return self._client

    def address(self, key: str) -> str:
        try:
            return str(self._topology().get_node_from_key(key).name)
        except RedisClusterException as exc:  # a slot no node serves
            raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc

    def connection(self, address: str) -> Connection:
        topology = self._topology()
        node = topology.get_node(node_name=address)
        if node is None:
            self.refresh()
            node = topology.get_node(node_name=address)
            if node is None:
                raise redis.ConnectionError(f"Redis Cluster: no node {address}")
        try:
            # The node's client knows the settings (timeouts, credentials, TLS).
            pool = topology.get_redis_connection(node).connection_pool
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc
        return pool.make_connection()

    def refresh(self) -> None:
        try:
            self._topology().nodes_manager.initialize()
        except RedisClusterException as exc:
            raise redis.ConnectionError(f"the Redis Cluster cannot be reached: {exc}") from exc


def make_redis(config: Config) -> redis.Redis:
    """A Redis client for publishing.

    It retries once on a broken connection (a pooled socket left over from a
    Redis restart) but never on a timeout, where the script may already have run.
    """
    return redis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.redis_timeout_seconds,
        socket_connect_timeout=config.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
    )


def make_topology(config: Config) -> Topology:
    """Where the partitions live: one Redis server (REDIS_URL), or a Redis Cluster
    (REDIS_MODE=cluster, REDIS_URL a seed node; reached on first use)."""
    if config.redis_mode == "cluster":
        return Cluster(config.redis_url, config.redis_timeout_seconds)
    return Standalone(make_redis(config))


class Session:
    """The connections one request uses, one per server, held until it ends
    (`with router.session() as session:`), then kept for the next request.

    WAIT covers the earlier writes of the connection it is sent on, so a
    request keeps its connection to each server: one WAIT per server at the
    end covers every partition it stored there.
    """

    __slots__ = ("_idle", "conns", "unconfirmed")

    def __init__(self, idle: dict[str, list[Connection]]) -> None:
        self._idle = idle
        self.conns: dict[str, Connection] = {}
        # A connection that carried this request's writes broke: WAIT on its
        # replacement would not cover them.
        self.unconfirmed = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        for address, conn in self.conns.items():
            self._idle.setdefault(address, []).append(conn)
        self.conns.clear()


class Router:
    """Runs steps on the server that holds a key, with the retry rules above."""

    def __init__(self, topology: Topology, timeout_seconds: float) -> None:
        self._topology = topology
        self._timeout = timeout_seconds
        # Idle connections per server, last used first; one per publish in flight at most.
        self._idle: dict[str, list[Connection]] = {}

    def session(self) -> Session:
        """A new request's connections; give them back by leaving its `with` block."""
        return Session(self._idle)

    def run(self, key: str, session: Session, step: Step[T]) -> T:
        """Run `step` on a connection to the server of `key`, with the retry rules."""
        topology = self._topology
        deadline = time.monotonic() + self._timeout
        redirect: str | None = None  # the server a MOVED or ASK named
        asking = False
        attempt = 0
        while True:
            attempt += 1
            address = topology.address(key) if redirect is None else redirect
            conn = session.conns.pop(address, None)
            carried_writes = conn is not None
            if conn is None:
                idle = self._idle.get(address)
                conn = idle.pop() if idle else topology.connection(address)
            try:
                result = step(conn, asking)
            except redis.ConnectionError:
                # A socket left over from a restart, or (cluster) a node gone:
                # reconnect, to the slot's server as the cluster sees it now.
                self._discard(conn, address, session, carried_writes)
                if attempt >= topology.attempts or time.monotonic() >= deadline:
                    raise
                redirect, asking = None, False
                topology.refresh()
                continue
            except (AskError, ClusterDownError, TryAgainError) as exc:
                # A reply like any other: the connection is in step and kept.
                session.conns[address] = conn
                if not topology.cluster or attempt >= topology.attempts or time.monotonic() >= deadline:
                    raise
                redirect, asking = self._redirected(exc, attempt, deadline)
                continue
            except BaseException:
                # A timeout, a script error, a killed greenlet: a reply may still be
                # on its way, so this connection is not reused as it is.
                self._discard(conn, address, session, carried_writes)
                raise
            session.conns[address] = conn
            return result

    def _discard(self, conn: Connection, address: str, session: Session, carried_writes: bool) -> None:
        """Close a connection that failed; it reconnects on its next use."""
        conn.disconnect()
        self._idle.setdefault(address, []).append(conn)
        session.unconfirmed = session.unconfirmed or carried_writes

    def _redirected(self, exc: redis.RedisError, attempt: int, deadline: float) -> tuple[str | None, bool]:
        """Where the next try goes after a cluster's refusal: (the server, or None for
        the slot's owner as learnt again; whether ASKING comes first)."""
        if isinstance(exc, MovedError):
            # The command did not run: the slot has moved (a failover).
            self._topology.refresh()
            return f"{exc.host}:{exc.port}", False
        if isinstance(exc, AskError):
            # The slot is being migrated: this one command goes to the
            # target, after ASKING.
            return f"{exc.host}:{exc.port}", True
        # A failover in progress: give it a moment.
        time.sleep(min(0.05 * attempt, max(0.0, deadline - time.monotonic())))
        self._topology.refresh()
        return None, False

    def ping(self, keys: Iterable[str]) -> bool:
        """True when every server holding one of `keys` answers PING."""
        seen: set[str] = set()
        with self.session() as session:
            for key in keys:
                address = self._topology.address(key)
                if address not in seen:
                    seen.add(address)
                    self.run(key, session, command("PING"))
        return True
