"""The Redis Cluster backend: rooms spread over the primaries of a Redis Cluster.

Everything works as on one Redis (same Lua scripts, same reader, presence and checks; see
`wsbroadcast.backends.redis`), with three differences:

- Keys carry a hash tag: a room's keys, and the node keys that scripts touch with them, are
  in one of ``partitions`` hash slots (`KeyLayout`),
  so every script and multi-key command stays in one slot, and the partitions' slots are
  spread evenly over the 16,384, hence over the primaries.
- A node runs one reader (one blocking ``XREAD``) per partition that holds its rooms,
  started at the first subscription to one of them: Redis Cluster refuses a command whose
  keys are in two slots, even on one primary, so one read cannot span partitions.
- A partition whose primary changed under a reader (a failover, or its slot moved) has its
  rooms checked before anything more is read from it: a promoted replica may have lost
  acknowledged writes (replication is asynchronous), and the check gives every room whose
  counter or last entry went back a new epoch, so listeners are reset (``history_lost``)
  rather than handed reused seqs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)

from ...exceptions import InvalidBackendOptions, InvalidBackendURL
from .backend import RedisBackend
from .keys import KeyLayout, Partition
from .link import UNREACHABLE, RedisHealth

__all__ = ["DEFAULT_PARTITIONS", "RedisClusterBackend"]

logger = logging.getLogger("wsbroadcast.backends.redis")

DEFAULT_PARTITIONS = 16
"""Hash slots the rooms are spread over: a few per primary is enough for an even spread."""

CLUSTER_UNREACHABLE: tuple[type[BaseException], ...] = (
    *UNREACHABLE,
    ClusterError,  # CLUSTERDOWN (a primary failed, no replica promoted yet), too many redirects
    TryAgainError,  # a multi-key command during a slot migration
    RedisClusterException,  # no node reachable, or a slot no node serves
    SlotNotCoveredError,
)
"""Errors that mean the cluster cannot serve the command now (retried with backoff)."""


class _WaitingCluster(RedisCluster):
    """A ``RedisCluster`` whose commands wait for a free connection, as one Redis's
    ``BlockingConnectionPool`` does, instead of failing at once.

    redis-py's cluster pools raise ``MaxConnectionsError`` when a node's ``max_connections``
    are all in use, which a burst of connects (each a few commands) reaches, and which reads
    as an outage. At most ``max_connections`` commands and pipelines are in flight here, so
    no node's pool is ever exhausted; one waits at most ``turn_timeout`` seconds for its turn.
    """

    slots: anyio.Semaphore | None = None
    turn_timeout: float = 5.0

    async def _turn(self) -> None:
        assert self.slots is not None
        with anyio.move_on_after(self.turn_timeout):
            await self.slots.acquire()
            return
        raise ConnectionError(f"no connection available within {self.turn_timeout} s")

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.slots is None:
            return await super().execute_command(*args, **kwargs)
        await self._turn()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self.slots.release()

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        if self.slots is None:
            return pipe
        execute, cluster = pipe.execute, self

        async def waiting(*args: Any, **kwargs: Any) -> Any:
            await cluster._turn()
            try:
                return await execute(*args, **kwargs)
            finally:
                assert cluster.slots is not None
                cluster.slots.release()

        pipe.execute = waiting  # type: ignore[method-assign]
        return pipe


@dataclass(frozen=True)
class RedisClusterHealth(RedisHealth):
    """What `RedisClusterBackend.health` reports: `RedisHealth` and the partitions."""

    partitions: int
    """Partitions the rooms are spread over."""
    readers: int
    """Partitions whose reader runs: each holds one blocking connection to its primary."""


class RedisClusterBackend(RedisBackend):
    """Orders, stores and fans out rooms through a Redis Cluster, for any number of processes.

    The same guarantees as `RedisBackend` (one order per
    room, resume, presence, rate limits across nodes), with rooms spread over the cluster's
    primaries through ``partitions`` hash tags. A room's keys share one slot, so its publish
    script stays atomic. See ``docs/backends.md`` ("Redis Cluster") for what a failover does.

    :param url: ``redis+cluster://host:port[,host:port...]/`` (``rediss+cluster://`` for TLS);
        any reachable node is enough to discover the others, more are tried in turn.
    :param partitions: hash slots the rooms are spread over (1 to 1,024). Every node of an
        application must use the same number (checked when entering, through the key
        ``<prefix>layout``): it decides where each room's keys are. Each node may hold one
        blocking connection per partition that holds its rooms.
    :param options: as for `RedisBackend`.
    """

    _url_options: ClassVar[dict[str, tuple[str, Callable[[str], Any]]]] = {
        "partitions": ("partitions", int)
    }
    _eager_readers = False

    def __init__(
        self,
        url: str = "redis+cluster://127.0.0.1:7000/",
        *,
        partitions: int = DEFAULT_PARTITIONS,
        **options: Any,
    ) -> None:
        self.startup_nodes, node_url = _parse_cluster_url(url)
        super().__init__(node_url, **options)
        self.cluster_url = url
        """The ``redis+cluster://`` URL this backend was built from."""
        self.partitions = partitions
        self._keys = KeyLayout(self.prefix, self.node_id, partitions)
        self._partitions = [Partition(index) for index in range(self._keys.count)]
        self._unreachable = CLUSTER_UNREACHABLE

    def _open_clients(self) -> tuple[Any, Any]:
        """Two ``RedisCluster`` clients: commands, and the readers' (one connection per
        partition reader per primary, with a socket timeout past the blocking read)."""
        options: dict[str, Any] = {
            "decode_responses": True,
            # Every error reaches this backend, which retries with its own backoff and
            # checks the rooms of a partition whose primary changed before reading on.
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": self.command_timeout,
            "require_full_coverage": False,
        }
        startup = [ClusterNode(host, port) for host, port in self.startup_nodes[1:]]
        commands = cast(
            _WaitingCluster,
            _WaitingCluster.from_url(
                self.url,
                startup_nodes=startup,
                max_connections=self.max_connections,
                socket_timeout=self.command_timeout,
                **options,
            ),
        )
        commands.slots = anyio.Semaphore(self.max_connections)
        commands.turn_timeout = self.command_timeout
        reader = RedisCluster.from_url(
            self.url,
            startup_nodes=[ClusterNode(host, port) for host, port in self.startup_nodes[1:]],
            max_connections=2 * self._keys.count + 2,
            socket_timeout=self.block_timeout + self.command_timeout,
            **options,
        )
        return commands, reader

    async def __aenter__(self) -> RedisClusterBackend:
        await super().__aenter__()
        try:
            await self._check_layout()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _check_layout(self) -> None:
        """Refuse to run beside nodes that spread rooms over another number of partitions:
        they would write the same room under other keys, as another stream."""
        assert self._redis is not None
        key = self.prefix + "layout"
        errors: tuple[type[BaseException], ...] = (*self._unreachable, RedisError)
        try:
            await self._redis.set(key, str(self.partitions), nx=True)
            stored: Any = await self._redis.get(key)
        except errors as exc:
            logger.warning("could not check the cluster's partitions (%r); not checked", exc)
            return
        if stored is not None and stored != str(self.partitions):
            raise InvalidBackendOptions(
                f"this cluster's rooms are spread over partitions={stored} (key {key!r}), "
                f"not {self.partitions}: every node must use the same number"
            )

    def _route(self, partition: int) -> str:
        """The primary (``host:port``) the readers' client sends ``partition``'s reads to."""
        reader = cast(RedisCluster, self._reader)
        try:
            node = reader.nodes_manager.get_node_from_slot(self._keys.slot(partition))
        except (RedisError, RedisClusterException, LookupError, AttributeError):
            return ""  # not known yet (before the first command), or the slot is not served
        return str(node.name)

    def health(self) -> RedisClusterHealth:
        """As `RedisBackend.health`, plus `partitions` and `readers`."""
        return RedisClusterHealth(
            **dataclasses.asdict(super().health()),
            partitions=self.partitions,
            readers=sum(partition.reading for partition in self._partitions),
        )


def _parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """Split ``redis+cluster://[user:pass@]h1:p1,h2:p2/?query`` into its nodes and a
    ``redis://`` URL of the first node with the same credentials and query."""
    parts = urlsplit(url)
    scheme = {"redis+cluster": "redis", "rediss+cluster": "rediss"}.get(parts.scheme)
    if scheme is None:
        raise InvalidBackendURL(f"not a redis+cluster:// or rediss+cluster:// URL: {url!r}")
    credentials, at, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        name, colon, number = item.strip().rpartition(":")
        if not colon or not name:
            name, number = item.strip(), "6379"
        try:
            nodes.append((name.strip("[]"), int(number)))
        except ValueError:
            raise InvalidBackendURL(f"bad node {item!r} in {url!r}") from None
    if not nodes or not nodes[0][0]:
        raise InvalidBackendURL(f"no node in {url!r}")
    if parts.path not in ("", "/", "/0"):
        raise InvalidBackendURL(f"a cluster has database 0 only: {url!r}")
    host, port = nodes[0]
    netloc = f"{credentials}{at}{'[' + host + ']' if ':' in host else host}:{port}"
    return nodes, urlunsplit((scheme, netloc, "/0", parts.query, ""))
