"""The Redis backend's key layout, defaults, and the state every part of the backend shares.

`RedisKeys` declares the attributes that `RedisBackend`
sets up, so that each concern (link, reader, presence) can be written as its own class in
its own module, and names every key (see the package docstring for the layout).
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ...exceptions import InvalidBackendOptions
from ..base import Backend

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from .reader import _RoomCursor

DEFAULT_HISTORY = 1000
"""Envelopes kept per room, at least (see ``exact_trim``)."""
DEFAULT_HISTORY_BYTES = 4 * 1024 * 1024
"""Bytes of envelopes (their wire form) kept per room, at most."""
DEFAULT_HISTORY_TTL = 600.0
"""Seconds a room with nobody in it is remembered after it was last used."""
DEFAULT_PREFIX = "wsbroadcast:"
MAX_PARTITIONS = 1024
"""Most partitions a cluster's rooms can be spread over."""


class KeyLayout:
    """Names every key of the backend, and spreads rooms over partitions.

    A *partition* is a group of rooms whose keys, and the node keys that scripts touch with
    them, share one Redis Cluster hash slot: a hash tag ``{<tag>}`` right after the prefix.
    Every Lua script and every multi-key command then names keys of one partition only, and
    a node's reader can read all its rooms of a partition with one blocking ``XREAD`` (Redis
    Cluster refuses a command whose keys are in two slots, even on the same primary).

    ``partitions=None`` is one Redis (no hash tag: the keys are exactly those of the
    package docstring); ``N`` spreads rooms over ``N`` tags, chosen so that their slots are
    evenly spaced over the 16,384 slots, hence over the primaries. A room's partition is the
    CRC-32 of its name modulo ``N``, so every node finds the same one.
    """

    def __init__(self, prefix: str, node_id: str, partitions: int | None = None) -> None:
        self.prefix = prefix
        self.node_id = node_id
        if partitions is None:
            self.tags = [""]
            self.tagged = False
        else:
            if not 1 <= partitions <= MAX_PARTITIONS:
                raise InvalidBackendOptions(
                    f"partitions must be between 1 and {MAX_PARTITIONS}, not {partitions}"
                )
            if "{" in prefix or "}" in prefix:
                raise InvalidBackendOptions(
                    f"a cluster's key prefix cannot hold braces: {prefix!r}"
                )
            self.tags = [f"{{{tag}}}:" for tag in _spread_tags(partitions)]
            self.tagged = True

    @property
    def count(self) -> int:
        """How many partitions there are (1 without hash tags)."""
        return len(self.tags)

    def partition(self, room: str) -> int:
        """The partition that holds ``room``'s keys."""
        if not self.tagged:
            return 0
        return zlib.crc32(room.encode()) % len(self.tags)

    def slot(self, partition: int) -> int:
        """The Redis Cluster hash slot of ``partition``'s keys."""
        return key_slot(self.key(partition, "x").encode())

    def key(self, partition: int, *parts: str) -> str:
        """A key of ``partition``: the prefix, its hash tag, then ``parts`` joined by ``:``."""
        return self.prefix + self.tags[partition] + ":".join(parts)

    def room(self, room: str, *parts: str) -> str:
        """A key of ``room``: its name with ``:`` escaped, then ``parts`` as they are."""
        return self.key(self.partition(room), "room", key_part(room), *parts)

    def room_prefix(self, partition: int) -> str:
        """What every room key of ``partition`` starts with (``room`` and ``:`` included)."""
        return self.key(partition, "room", "")

    def client(self, room: str, client_id: str) -> str:
        """The hash of ``client_id``'s connections in ``room``, per node."""
        return self.room(room, "client", key_part(client_id))

    def log(self, room: str) -> str:
        """The stream that holds ``room``'s history."""
        return self.room(room, "log")

    def stream(self, room: str) -> str:
        """The hash of ``room``'s counter, epoch and log size."""
        return self.room(room, "stream")

    def node(self, partition: int, node: str, *parts: str) -> str:
        """A key of ``node`` in ``partition`` (its heartbeat without ``parts``)."""
        return self.key(partition, "node", node, *parts)

    def node_prefix(self, partition: int) -> str:
        """What every node key of ``partition`` starts with."""
        return self.key(partition, "node", "")

    def index(self, partition: int, node: str) -> str:
        """The set of ``"<room> <client>"`` that ``node`` holds in ``partition``'s rooms."""
        return self.node(partition, node, "presence")

    def wake(self, partition: int) -> str:
        """The stream this node's reader of ``partition`` blocks on, to be re-armed."""
        return self.node(partition, self.node_id, "wake")

    def nodes(self, partition: int) -> str:
        """The set of the nodes that may be alive, as ``partition`` knows them."""
        return self.key(partition, "nodes")

    def generation(self, partition: int) -> str:
        """The hash whose ``id`` names the data of ``partition`` (see ``RedisLink``)."""
        return self.key(partition, "generation")

    def rate(self, key: str) -> str:
        """The token bucket ``key`` of ``allow``: one key, in any slot."""
        return self.prefix + "rate:" + key


def _spread_tags(count: int) -> list[str]:
    """``count`` hash tags whose slots fall one in each of ``count`` equal ranges of slots.

    Tag ``i`` is the first ``"<i>.<k>"`` (k = 0, 1, ...) whose slot is in the i-th range, so
    the tags are the same on every node and partition i's slot is near ``i * 16384 / count``.
    """
    tags: list[str] = []
    for index in range(count):
        low = index * REDIS_CLUSTER_HASH_SLOTS // count
        high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count
        attempt = 0
        while True:
            tag = f"{index}.{attempt}"
            if low <= key_slot(tag.encode()) < high:
                tags.append(tag)
                break
            attempt += 1
    return tags


class Partition:
    """What this node knows of one partition: its reader's state and its data's generation."""

    __slots__ = (
        "check_pending",
        "generation",
        "generation_unsure",
        "index",
        "reading",
        "rooms",
        "route",
        "wake_id",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.generation: str | None = None
        """The id of the partition's data when this node last looked (None: not yet)."""
        self.generation_unsure = False
        """The generation must be read afresh before the next read."""
        self.check_pending = False
        """The rooms must be checked before the next read (an outage, a data loss, a move)."""
        self.reading = False
        """A reader task runs for this partition."""
        self.route: str | None = None
        """The server the reader last read this partition from (None: not yet)."""
        self.rooms: dict[str, _RoomCursor] = {}
        """The rooms of this partition that have local listeners."""
        self.wake_id = "0-0"
        """The last entry the reader read from its wake stream."""


class RedisKeys(Backend):
    """The state shared by the Redis backend's parts, and the names of its keys."""

    url: str
    prefix: str
    history_size: int
    history_bytes: int
    history_ttl: float | None
    exact_trim: bool
    heartbeat_interval: float
    presence_ttl: float
    block_timeout: float
    command_timeout: float
    backoff_initial: float
    backoff_max: float
    read_count: int
    max_connections: int
    node_id: str

    _redis: Redis | None
    _reader: Redis | None
    _task_group: TaskGroup | None
    _rooms: dict[str, _RoomCursor]
    _presence: Counter[tuple[str, str]]
    _keys: KeyLayout
    _partitions: list[Partition]
    _unreachable: tuple[type[BaseException], ...]
    _connected: bool
    _ever_connected: bool
    _outage_logged: bool
    _last_reply: float | None
    _write_refused: str | None
    _resync_pending: bool
    _resyncing: anyio.Event | None
    _presence_changes: int
    _presence_idle: anyio.Event | None
    _reconnects: int
    _last_error: str | None
    _data_losses: int
    _resets: int
    _gaps: int
    _publish_failures: int
    _reaped_nodes: int

    _publish_script: AsyncScript
    _ensure_generation_script: AsyncScript
    _check_rooms_script: AsyncScript
    _add_presence_script: AsyncScript
    _restore_presence_script: AsyncScript
    _remove_presence_script: AsyncScript
    _reap_presence_script: AsyncScript
    _presence_script: AsyncScript
    _heartbeat_script: AsyncScript
    _allow_script: AsyncScript

    @property
    def _room_ttl_ms(self) -> int:
        """The TTL of a room's keys in ms (0: they never expire)."""
        return 0 if self.history_ttl is None else max(1, math.ceil(self.history_ttl * 1000))

    @property
    def _node_ttl_ms(self) -> int:
        """The TTL of a node's own keys: they outlive its heartbeat long enough to be reaped,
        and vanish if no node is left to reap them."""
        return math.ceil((self.presence_ttl + (self.history_ttl or DEFAULT_HISTORY_TTL)) * 1000)


def key_part(name: str) -> str:
    """``name`` as written in a key: ``:`` separates a key's parts, so it is ``%3A`` in a name."""
    return name.replace(":", "%3A")


def entry_seq(entry_id: str) -> int:
    """The seq of a log entry: its id is ``<seq>-0``."""
    return int(entry_id.partition("-")[0])
