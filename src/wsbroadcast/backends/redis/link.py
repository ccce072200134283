"""The Redis backend's link to Redis: health, backoff, errors, and Redis's generation.

Whether Redis is reachable, responsive and writable; how long to wait before retrying;
redis-py's errors turned into the library's; commands that must finish even if their caller
is cancelled; and the generation id that tells a Redis that lost its data.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...exceptions import BackendError, BackendUnavailable
from ..base import BackendHealth
from .keys import Partition, RedisKeys

logger = logging.getLogger("wsbroadcast.backends.redis")

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""redis-py's errors that mean Redis could not be reached (or did not answer in time)."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class RedisHealth(BackendHealth):
    """What `RedisBackend.health` reports: `BackendHealth` and the link to Redis."""

    node_id: str
    """This node's id (its presence and heartbeat keys)."""
    connected: bool
    """Whether Redis answered the last command."""
    responsive: bool
    """Connected, and answered within `heartbeat_interval + command_timeout`."""
    writable: bool
    """False while Redis refuses writes (`OOM`, `READONLY`) and none succeeded since."""
    reconnects: int
    """Recoveries after an outage."""
    last_error: str | None
    """The last error talking to Redis, as `"Type: message"`."""
    rooms: int
    """Rooms this node reads from Redis."""
    data_losses: int
    """Times Redis came back without its data."""
    resets: int
    """Stream resets (`history_lost`) told to listeners."""
    gaps: int
    """Resets caused by envelopes trimmed (or unreadable) before this node read them."""
    publish_failures: int
    """Publishes Redis could not take."""
    reaped_nodes: int
    """Dead nodes whose presence this node removed."""


class RedisLink(RedisKeys):
    """Tracks the link to Redis and turns its failures into the library's errors."""

    def _client(self) -> Redis:
        if self._redis is None or self._task_group is None:
            raise RuntimeError("use the RedisBackend inside 'async with' (the manager does)")
        return self._redis

    # -- health

    def health(self) -> RedisHealth:
        """Status for ``/healthz`` and metrics.

        ``status`` is ``"degraded"`` while Redis cannot be reached, or has answered no
        command for longer than ``heartbeat_interval + command_timeout`` (a frozen Redis:
        the heartbeat would have had its answer), or refuses writes (a publish, presence
        change or heartbeat was refused, e.g. ``OOM`` or ``READONLY``, and none succeeded
        since). ``reconnects`` counts recoveries after an outage, ``data_losses`` the times
        Redis came back without its data, ``resets`` the stream resets told to listeners,
        ``gaps`` those caused by envelopes trimmed (or unreadable) before this node read them.
        """
        stale = self._stale()
        degraded = not self._connected or stale or self._write_refused is not None
        return RedisHealth(
            status="degraded" if degraded else "ok",
            backend=type(self).__name__,
            node_id=self.node_id,
            connected=self._connected,
            responsive=self._connected and not stale,
            writable=self._write_refused is None,
            reconnects=self._reconnects,
            last_error=self._last_error,
            rooms=len(self._rooms),
            data_losses=self._data_losses,
            resets=self._resets,
            gaps=self._gaps,
            publish_failures=self._publish_failures,
            reaped_nodes=self._reaped_nodes,
        )

    def _stale(self) -> bool:
        """True if Redis answered nothing for longer than a healthy node ever waits."""
        if self._last_reply is None:
            return True
        silence = time.monotonic() - self._last_reply
        return silence > self.heartbeat_interval + self.command_timeout

    @property
    def _check_pending(self) -> bool:
        """Whether the rooms of some partition must be checked before its reader reads on."""
        return any(partition.check_pending for partition in self._partitions)

    def _mark_down(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._resync_pending = True
        for partition in self._partitions:
            partition.check_pending = True
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("Redis unreachable (%s); retrying with backoff", self._last_error)
        self._connected = False

    def _mark_up(self) -> None:
        """Redis answered: it is reachable (whether or not it did what was asked)."""
        self._last_reply = time.monotonic()
        if not self._connected:
            if self._ever_connected:
                self._reconnects += 1
                logger.warning(
                    "Redis reachable again; checking and reading %d rooms from where they stopped",
                    len(self._rooms),
                )
            self._connected = True
            self._ever_connected = True
            self._outage_logged = False

    def _mark_refused(self, exc: BaseException) -> None:
        """Redis answered a write with an error (out of memory, read-only replica, ...)."""
        self._mark_up()
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._write_refused is None:
            logger.warning("Redis refuses writes (%s)", self._last_error)
        self._write_refused = self._last_error

    def _mark_writable(self) -> None:
        """A write succeeded: Redis takes writes (again)."""
        self._mark_up()
        if self._write_refused is not None:
            self._write_refused = None
            logger.warning("Redis takes writes again")

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        return float(delay / 2 + random.uniform(0, delay / 2))

    def _unavailable(self, what: str, exc: BaseException) -> BackendUnavailable:
        self._mark_down(exc)
        return BackendUnavailable(f"Redis unreachable, could not {what}: {exc}")

    @contextmanager
    def _commands(self, what: str, *, write: bool = False) -> Iterator[None]:
        """Turn redis-py's errors into ours: unreachable -> BackendUnavailable, refused ->
        BackendError, so no redis-py exception ever reaches the manager or the application.
        Any answer, even a refusal, proves Redis reachable; ``write`` commands also tell
        whether Redis takes writes."""
        try:
            yield
        except self._unreachable as exc:
            raise self._unavailable(what, exc) from exc
        except RedisError as exc:
            if write:
                self._mark_refused(exc)
            else:
                self._mark_up()
            raise BackendError(f"Redis refused to {what}: {exc}") from exc
        if write:
            self._mark_writable()
        else:
            self._mark_up()

    async def _shielded(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``call`` to its end even if the caller is cancelled, so that its outcome in
        Redis is always known here. Bounded: every command has ``command_timeout`` (for a
        pooled connection, connecting and the reply), so this waits at most about three
        times that; past it, the outcome is unknown and the call fails as unreachable."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(3 * self.command_timeout + 1) as scope:
                return await call()
        assert scope.cancelled_caught
        raise RedisTimeoutError(f"no answer within {3 * self.command_timeout + 1} s")

    # -- generation (detects a Redis that lost its data)

    async def _sync_generation(self, partition: Partition) -> None:
        assert self._redis is not None
        raw = await self._ensure_generation_script(
            keys=[self._keys.generation(partition.index)], args=[uuid.uuid4().hex]
        )
        self._mark_up()
        partition.generation_unsure = False
        self._adopt_generation(partition, str(raw))

    def _adopt_generation(self, partition: Partition, generation: str) -> None:
        """Remember the partition's generation; a different one than before means Redis (or,
        in a cluster, the primary that serves the partition) lost its data.

        The partition's rooms are then checked (before its reader's next read): each room
        whose stream is gone or restarted gets a `StreamReset` and is read from its
        new start.
        """
        if partition.generation is None:
            partition.generation = generation
        elif generation != partition.generation:
            logger.warning(
                "Redis lost its data (generation %s is now %s): listeners of %d rooms are "
                "told their stream was reset, resuming clients are told history is lost",
                partition.generation,
                generation,
                len(self._rooms),
            )
            partition.generation = generation
            self._data_losses += 1
            partition.check_pending = True
            self._resync_pending = True
