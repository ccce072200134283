"""The Redis backend's class: configuration, lifecycle, publish, history and rate limits."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ...envelope import Draft, Envelope, new_epoch
from ...exceptions import BackendError, InvalidBackendOptions, InvalidBackendURL, InvalidInput
from ..base import History
from . import scripts
from .keys import (
    DEFAULT_HISTORY,
    DEFAULT_HISTORY_BYTES,
    DEFAULT_HISTORY_TTL,
    DEFAULT_PREFIX,
    KeyLayout,
    Partition,
    entry_seq,
)
from .link import UNREACHABLE
from .presence import RedisPresence
from .reader import _RoomCursor

logger = logging.getLogger("wsbroadcast.backends.redis")

_APPROXIMATE_SLACK = 100
"""Without ``exact_trim``, a log is trimmed back to ``history_size`` once it holds this many
more: one trim per 100 publishes instead of one per publish."""
_MAX_SEQ = 2**63
"""Redis counters are signed 64-bit: no seq reaches this."""


class RedisBackend(RedisPresence):
    """Orders, stores and fans out rooms through Redis, for any number of processes.

    Every process (node) opens its own ``RedisBackend`` on the same Redis. A room's stream
    has its own epoch, chosen when its counter is created; its seq is assigned by a Lua
    script that increments the counter and appends the envelope (seq and epoch spliced in)
    to the room's log in one step. Each node's reader delivers a room's log to the local
    listeners in seq order, resuming where it stopped after a reconnect; when it cannot (the
    stream was lost or restarted, entries were trimmed before it read them), it tells the
    listeners' ``on_reset`` first. History is the log, bounded by ``history_size`` entries
    and ``history_bytes``; every key of a room expires ``history_ttl`` seconds after the
    room was last used (published to, or held by a node's listeners or presence), so rooms
    nobody uses cost nothing. Presence counts connections per (room, client, node); a
    node's entries stop counting when its heartbeat key expires (``presence_ttl`` seconds
    after its last beat), and a surviving node then announces the ``leave`` events.

    asyncio only (redis-py's client is). Use it as ``async with`` (a ``ConnectionManager``
    does that): it runs a reader and a heartbeat task until it exits. If Redis is
    unreachable, it keeps retrying with exponential backoff, `health` says
    ``degraded``, and publishing raises `BackendUnavailable`.

    :param url: ``redis://host:port/db`` or ``rediss://...``, passed to redis-py.
    :param prefix: prepended to every key, so several applications can share a database.
    :param history_size: envelopes kept per room, at least (unless ``history_bytes`` is
        reached first; up to 100 more unless ``exact_trim``). It also bounds how long a
        node's reader may be cut off from Redis before it misses envelopes.
    :param history_bytes: bytes of envelope text kept per room, at most; the newest envelope
        is always kept, even alone larger than this, so that every node can read it.
    :param history_ttl: seconds after its last use that a room is forgotten (counter, epoch,
        history, presence); None never forgets. Must exceed ``2 * heartbeat_interval``.
    :param exact_trim: trim logs to exactly ``history_size`` on every publish, instead of
        once per 100 publishes.
    :param heartbeat_interval: seconds between heartbeats of this node.
    :param presence_ttl: seconds after its last heartbeat that a silent node's connections
        stop counting in presence. Must exceed ``heartbeat_interval``.
    :param block_timeout: seconds one blocking ``XREAD`` may wait before being re-issued.
    :param command_timeout: seconds any other Redis command may take (and connect timeout).
    :param backoff_initial: first delay before reconnecting, doubled per failure ...
    :param backoff_max: ... up to this many seconds.
    :param read_count: stream entries read per room per ``XREAD``.
    :param max_connections: Redis connections this node's command pool may open. When all
        are busy (a burst of handshakes), a command waits up to ``command_timeout`` for one
        instead of failing at once.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        history_size: int = DEFAULT_HISTORY,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        history_ttl: float | None = DEFAULT_HISTORY_TTL,
        exact_trim: bool = False,
        heartbeat_interval: float = 5.0,
        presence_ttl: float = 15.0,
        block_timeout: float = 5.0,
        command_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        read_count: int = 1000,
        max_connections: int = 50,
    ) -> None:
        if history_size < 1:
            raise InvalidBackendOptions(f"history size must be >= 1, not {history_size}")
        if history_bytes < 1:
            raise InvalidBackendOptions(f"history_bytes must be >= 1, not {history_bytes}")
        if not 0 < heartbeat_interval < presence_ttl:
            raise InvalidBackendOptions(
                f"need 0 < heartbeat_interval ({heartbeat_interval}) "
                f"< presence_ttl ({presence_ttl})"
            )
        if history_ttl is not None and not history_ttl > 2 * heartbeat_interval:
            raise InvalidBackendOptions(
                f"history_ttl ({history_ttl}) must exceed 2 * heartbeat_interval "
                f"({heartbeat_interval}): heartbeats keep used rooms alive"
            )
        for name, value in (
            ("block_timeout", block_timeout),
            ("command_timeout", command_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise InvalidBackendOptions(f"{name} must be positive, not {value}")
        if read_count < 1:
            raise InvalidBackendOptions(f"read_count must be >= 1, not {read_count}")
        if max_connections < 1:
            raise InvalidBackendOptions(f"max_connections must be >= 1, not {max_connections}")
        self.url = url
        self.prefix = prefix
        self.history_size = history_size
        self.history_bytes = history_bytes
        self.history_ttl = history_ttl
        self.exact_trim = exact_trim
        self.heartbeat_interval = heartbeat_interval
        self.presence_ttl = presence_ttl
        self.block_timeout = block_timeout
        self.command_timeout = command_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.read_count = read_count
        self.max_connections = max_connections
        self.node_id = uuid.uuid4().hex
        """This node's id in Redis (presence and heartbeat keys)."""

        self._redis: Redis | None = None
        self._reader: Redis | None = None
        self._task_group: TaskGroup | None = None
        self._rooms: dict[str, _RoomCursor] = {}
        self._presence: Counter[tuple[str, str]] = Counter()
        self._keys = KeyLayout(prefix, self.node_id)
        self._partitions = [Partition(index) for index in range(self._keys.count)]
        self._unreachable = UNREACHABLE
        self._connected = False
        self._ever_connected = False
        self._outage_logged = False
        self._last_reply: float | None = None
        self._write_refused: str | None = None
        self._resync_pending = False
        self._resyncing: anyio.Event | None = None
        self._presence_changes = 0
        self._presence_idle: anyio.Event | None = None
        self._reconnects = 0
        self._last_error: str | None = None
        self._data_losses = 0
        self._resets = 0
        self._gaps = 0
        self._publish_failures = 0
        self._reaped_nodes = 0

    _url_options: ClassVar[dict[str, tuple[str, Callable[[str], Any]]]] = {}
    """Query options a subclass adds to `from_url`'s: name -> (argument, converter)."""

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """Build from ``redis://host:port/db?history=N&history_bytes=B&history_ttl=S&prefix=P
        &presence_ttl=S&heartbeat=S`` (``history_ttl=none`` never forgets a room).

        Those options are ours; any other query option is passed on to redis-py.
        """
        parts = urlsplit(url)
        ours: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []

        def ttl(value: str) -> float | None:
            return None if value.lower() == "none" else float(value)

        converters: dict[str, tuple[str, Callable[[str], Any]]] = {
            "history": ("history_size", int),
            "history_bytes": ("history_bytes", int),
            "history_ttl": ("history_ttl", ttl),
            "prefix": ("prefix", str),
            "presence_ttl": ("presence_ttl", float),
            "heartbeat": ("heartbeat_interval", float),
            **cls._url_options,
        }
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in converters:
                name, convert = converters[key]
                try:
                    ours[name] = convert(value)
                except ValueError:
                    raise InvalidBackendURL(f"bad {key}={value!r} in {url!r}") from None
            else:
                rest.append((key, value))
        redis_url = urlunsplit(parts._replace(query=urlencode(rest)))
        return cls(redis_url, **ours)

    # -- lifecycle

    async def __aenter__(self) -> RedisBackend:
        if self._task_group is not None:
            raise RuntimeError(f"a {type(self).__name__} can only be entered once")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{type(self).__name__} runs on asyncio only (redis-py's client does)"
            ) from None
        self._redis, self._reader = self._open_clients()
        self._publish_script = self._redis.register_script(scripts.PUBLISH)
        self._ensure_generation_script = self._redis.register_script(scripts.ENSURE_GENERATION)
        self._check_rooms_script = self._redis.register_script(scripts.CHECK_ROOMS)
        self._add_presence_script = self._redis.register_script(scripts.ADD_PRESENCE)
        self._restore_presence_script = self._redis.register_script(scripts.RESTORE_PRESENCE)
        self._remove_presence_script = self._redis.register_script(scripts.REMOVE_PRESENCE)
        self._reap_presence_script = self._redis.register_script(scripts.REAP_PRESENCE)
        self._presence_script = self._redis.register_script(scripts.PRESENCE)
        self._heartbeat_script = self._redis.register_script(scripts.HEARTBEAT)
        self._allow_script = self._redis.register_script(scripts.ALLOW)
        try:
            await self._heartbeat()
            for partition in self._partitions:
                await self._sync_generation(partition)
        except self._unreachable as exc:
            self._mark_down(exc)
        except RedisError as exc:
            self._mark_refused(exc)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        if self._eager_readers:
            for partition in self._partitions:
                self._start_reader(partition)
        task_group.start_soon(self._run_heartbeat)
        return self

    _eager_readers = True
    """Start every partition's reader on entry (one Redis: its one reader), rather than at
    the first subscription to one of its rooms."""

    def _open_clients(self) -> tuple[Any, Any]:
        """The client for commands (a pool of ``max_connections``) and the reader's client."""
        options: dict[str, Any] = {
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
            "socket_connect_timeout": self.command_timeout,
        }
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.command_timeout,
            socket_timeout=self.command_timeout,
            **options,
        )
        commands = Redis.from_pool(pool)
        # The reader's socket timeout outlasts its blocking XREAD, so a dead link still fails.
        reader = Redis.from_url(
            self.url, socket_timeout=self.block_timeout + self.command_timeout, **options
        )
        return commands, reader

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group = self._task_group
        if task_group is None:
            return
        task_group.cancel_scope.cancel()
        try:
            await task_group.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.command_timeout):
                try:
                    await self._leave_cluster()
                except (RedisError, OSError) as error:
                    logger.warning("could not remove node %s from Redis: %r", self.node_id, error)
            assert self._redis is not None
            assert self._reader is not None
            await self._reader.aclose()
            await self._redis.aclose()

    async def _leave_cluster(self) -> None:
        """Drop this node's heartbeat, so that its remaining presence expires at once.

        The node stays in the nodes set: a surviving node reaps what it still held and
        announces the leaves.
        """
        assert self._redis is not None
        for partition in range(self._keys.count):
            await self._redis.delete(
                self._keys.node(partition, self.node_id), self._keys.wake(partition)
            )

    # -- publish and history

    async def publish_draft(self, draft: Draft) -> Envelope:
        """Number and append the envelope in one Lua script; local delivery is the reader's.

        The room's stream gets a fresh epoch if it has none (a new or forgotten room, or a
        Redis that lost it): seq starts at 1 in it. A publish whose connection fails is
        retried once on a fresh connection; a receipt keyed by the envelope id (kept
        ``2 * command_timeout`` seconds) makes the retry a no-op if the first attempt did
        reach Redis, so nothing is published twice. Raises
        `BackendUnavailable` if both attempts fail. In the
        rare case that both replies were lost after Redis ran the script, the envelope was
        published although this raised: never silently lost, at worst reported lost.
        """
        client = self._client()
        room = draft.room
        keys = [
            self._keys.stream(room),
            self._keys.log(room),
            self._keys.room(room, "members"),
            # Per room: a direct message is one id published in two personal streams.
            self._keys.room(room, "receipt", draft.id),
        ]
        args: list[str | int] = [
            new_epoch(),
            self.history_size,
            0 if self.exact_trim else _APPROXIMATE_SLACK,
            self.history_bytes,
            draft.head,
            draft.tail,
            int(2000 * self.command_timeout),
            self._room_ttl_ms,
        ]
        try:
            try:
                result = await self._publish_script(keys=keys, args=args, client=client)
            except self._unreachable:
                result = await self._publish_script(keys=keys, args=args, client=client)
        except self._unreachable as exc:
            self._publish_failures += 1
            raise self._unavailable(f"publish to {room!r}", exc) from exc
        except RedisError as exc:
            self._publish_failures += 1
            self._mark_refused(exc)
            raise BackendError(f"Redis refused the publish to {room!r}: {exc}") from exc
        self._mark_writable()
        seq, _, epoch = str(result).partition(" ")
        return draft.envelope(int(seq), epoch)

    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        """Read the room's stream hash and log in one transaction: all or nothing.

        A ``since`` that no seq can reach (negative, or ``2**63`` and more) is answered
        ``complete=False`` without asking Redis for entries it cannot name.
        """
        client = self._client()
        readable = 0 <= since < _MAX_SEQ - 1
        with self._commands(f"read the history of {room!r}"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.hmget(self._keys.stream(room), "seq", "epoch")
                pipe.xrange(self._keys.log(room), count=1)
                if readable:
                    pipe.xrange(self._keys.log(room), min=f"{since + 1}-0", max="+")
                results = await pipe.execute()
        (raw_seq, raw_epoch), oldest = results[0], results[1]
        entries: list[tuple[str, Mapping[str, str]]] = results[2] if readable else []
        if raw_epoch is None:
            return History(room, since, complete=since == 0, last_seq=0, first_seq=1)
        stream_epoch = str(raw_epoch)
        last = int(raw_seq or 0)
        first = entry_seq(oldest[0][0]) if oldest else last + 1
        complete = (
            readable
            and first - 1 <= since <= last
            and (since == 0 or epoch is None or epoch == stream_epoch)
        )
        envelopes: tuple[Envelope, ...] = ()
        if complete and since < last:
            try:
                envelopes = tuple(Envelope.from_text(entry["e"]) for _, entry in entries)
            except (KeyError, ValueError):
                logger.exception("room %r: its log holds an entry that is not an envelope", room)
                envelopes = ()
            seqs = [envelope.seq for envelope in envelopes]
            if seqs != list(range(since + 1, last + 1)) or any(
                envelope.epoch != stream_epoch for envelope in envelopes
            ):
                complete, envelopes = False, ()
        return History(room, since, complete, last, first, envelopes, stream_epoch)

    # -- rate limits

    async def allow(self, key: str, rate: float, burst: float) -> bool:
        """Take one token from the bucket ``key``, shared by every node through Redis.

        The bucket lives in ``P rate:<key>`` (on Redis's clock) and expires once it would be
        full again. Raises `BackendUnavailable` if Redis
        cannot be reached: the caller decides whether to fail open (let the message through,
        perhaps under a local `Backend.allow` bucket) or closed (refuse it).
        """
        if not (rate > 0 and burst >= 1 and math.isfinite(rate) and math.isfinite(burst)):
            raise InvalidInput(f"need rate > 0 and burst >= 1, not {rate} and {burst}")
        client = self._client()
        with self._commands("take a rate-limit token", write=True):
            allowed = await self._allow_script(
                keys=[self._keys.rate(key)],
                args=[repr(float(rate)), repr(float(burst))],
                client=client,
            )
        return bool(allowed)
