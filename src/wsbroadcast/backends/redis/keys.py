"""The Redis backend's key layout, defaults, and the state every part of the backend shares.

:class:`RedisKeys` declares the attributes that :class:`~wsbroadcast.backends.redis.RedisBackend`
sets up, so that each concern (link, reader, presence) can be written as its own class in
its own module, and names every key (see the package docstring for the layout).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from ...backend import Backend

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from .reader import _Room

DEFAULT_HISTORY = 1000
"""Envelopes kept per room, at least (see ``exact_trim``)."""
DEFAULT_HISTORY_BYTES = 4 * 1024 * 1024
"""Bytes of envelopes (their wire form) kept per room, at most."""
DEFAULT_HISTORY_TTL = 600.0
"""Seconds a room with nobody in it is remembered after it was last used."""
DEFAULT_PREFIX = "wsbroadcast:"


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
    _rooms: dict[str, _Room]
    _presence: Counter[tuple[str, str]]
    _wake_id: str
    _generation: str | None
    _connected: bool
    _ever_connected: bool
    _outage_logged: bool
    _last_reply: float | None
    _write_refused: str | None
    _resync_pending: bool
    _check_pending: bool
    _generation_unsure: bool
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

    # -- keys

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _room_key(self, room: str, *parts: str) -> str:
        """A key of ``room``: its name with ``:`` escaped, then ``parts`` as they are."""
        return self._key("room", key_part(room), *parts)

    def _client_key(self, room: str, client_id: str) -> str:
        return self._room_key(room, "client", key_part(client_id))

    def _log_key(self, room: str) -> str:
        return self._room_key(room, "log")

    def _stream_key(self, room: str) -> str:
        return self._room_key(room, "stream")

    @property
    def _wake_key(self) -> str:
        return self._key("node", self.node_id, "wake")

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
