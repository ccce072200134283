"""The Redis backend: many processes on many machines share one order, history and presence.

Everything that must be agreed on lives in Redis and is changed by Lua scripts, so two nodes
can never hand out the same or out-of-order numbers. Key layout (``P`` is the prefix,
``wsbroadcast:`` by default)::

    P generation                      hash {id, base}: who this Redis's data belongs to
    P room:<room>:seq                 string: the room's last seq (the counter)
    P room:<room>:log                 stream: entry id "<seq>-0", field "e" = envelope JSON
    P room:<room>:members             set of client ids that may be present
    P room:<room>:client:<client>     hash node id -> connections of the client on that node
    P nodes                           set of node ids that may be alive
    P node:<id>                       heartbeat, expires after ``presence_ttl``
    P node:<id>:presence              set of "<room> <client>" the node holds (for the reaper)
    P node:<id>:wake                  stream the node's reader blocks on to be re-armed
    P receipt:<envelope id>           seq of a publish, for a few seconds: retries are no-ops

One reader task per backend does a single blocking ``XREAD`` over the logs of the rooms with
local listeners (and its wake stream), and calls the listeners in seq order. See
``docs/backends.md`` for the guarantees, their costs and the behaviour on each fault.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from anyio.abc import TaskGroup
from pydantic import JsonValue
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..backend import Backend, History, Listener, ResetListener, Subscription
from ..envelope import Draft, Envelope
from ..exceptions import BackendError, BackendUnavailable, InvalidBackendURL

__all__ = ["RedisBackend"]

logger = logging.getLogger("wsbroadcast.backends.redis")

DEFAULT_HISTORY = 1000
DEFAULT_PREFIX = "wsbroadcast:"

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

# KEYS: generation, counter, log, receipt. ARGV: generation id, maxlen, "~" or "=", text head,
# text tail, receipt ttl (ms). The envelope text is spliced around the seq here, so the stored
# text is final. The receipt (envelope id -> seq) makes a retried publish a no-op.
_PUBLISH = """
local done = redis.call('GET', KEYS[4])
if done then return {'OK', done} end
local gen = redis.call('HMGET', KEYS[1], 'id', 'base')
if not gen[1] then return {'NOGEN'} end
if gen[1] ~= ARGV[1] then return {'GEN'} end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], gen[2]) end
local seq = string.format('%d', redis.call('INCR', KEYS[2]))
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], ARGV[2], seq .. '-0', 'e', ARGV[4] .. seq .. ARGV[5])
redis.call('SET', KEYS[4], seq, 'PX', ARGV[6])
return {'OK', seq}
"""

# KEYS: generation. ARGV: candidate id, candidate base, the id the caller knew ("" if none).
# A caller that knew another generation knows data was lost: rooms then restart their seq
# at ``base`` (microseconds since 1970), above any number handed out before the loss.
_ENSURE_GENERATION = """
local cur = redis.call('HMGET', KEYS[1], 'id', 'base')
if not cur[1] then
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'base', ARGV[2])
  return {ARGV[1], ARGV[2]}
end
if ARGV[3] ~= '' and cur[1] ~= ARGV[3] and cur[2] == '0' then
  redis.call('HSET', KEYS[1], 'base', ARGV[2])
  cur[2] = ARGV[2]
end
return cur
"""

# Shared by the presence scripts: true if a node other than ARGV[1] holding a connection of
# the client in KEYS[1] is alive. Leftovers of dead nodes are dropped on the way.
_OTHER_LIVE_NODE = """
local function other_live_node(hash, me, node_prefix)
  local fields = redis.call('HGETALL', hash)
  for i = 1, #fields, 2 do
    local node = fields[i]
    if node ~= me and tonumber(fields[i + 1]) > 0 then
      if redis.call('EXISTS', node_prefix .. node) == 1 then return true end
      redis.call('HDEL', hash, node)
    end
  end
  return false
end
"""

# KEYS: client hash, members set, node index. ARGV: node id, client, index entry, node prefix.
_ADD_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
if n > 1 or other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
return 1
"""
)

# Same KEYS and ARGV as _ADD_PRESENCE; ARGV[5] is the count to restore.
_RESTORE_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
if new == 0 or other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
return 1
"""
)

# Same KEYS and ARGV as _ADD_PRESENCE.
_REMOVE_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if c <= 0 then return 0 end
if c > 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[3])
if other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: client hash, members set, the reaped node's index and heartbeat. ARGV: reaped node id,
# client, index entry, node prefix, "1" to back off if the node is alive after all. Each entry
# is reaped once (whoever removes it from the index); returns 1 if the client is gone.
_REAP_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
if redis.call('SREM', KEYS[3], ARGV[3]) == 0 then return 0 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
if other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""
)

# KEYS: members set. ARGV: client hash prefix, node prefix. Read-only.
_PRESENCE = """
local out, alive = {}, {}
for _, client in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. client)
  for i = 1, #fields, 2 do
    local node = fields[i]
    if alive[node] == nil then alive[node] = redis.call('EXISTS', ARGV[2] .. node) == 1 end
    if alive[node] and tonumber(fields[i + 1]) > 0 then
      out[#out + 1] = client
      break
    end
  end
end
return out
"""

# KEYS: heartbeat key, nodes set. ARGV: ttl in ms, node id. Returns whether the key existed.
_HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return existed
"""


class _Subscriber:
    __slots__ = ("listener", "start")

    def __init__(self, listener: Listener, start: int) -> None:
        self.listener = listener
        self.start = start
        """Envelopes with ``seq <= start`` were published before ``subscribe`` returned."""


class _Room:
    __slots__ = ("last_seq", "position", "subscribers")

    def __init__(self, last_seq: int) -> None:
        self.subscribers: list[_Subscriber] = []
        self.last_seq = last_seq
        self.position = f"{last_seq}-0"
        """The stream id the reader reads after: the last entry it handled."""


class _RedisSubscription:
    def __init__(self, backend: RedisBackend, room: str, subscriber: _Subscriber) -> None:
        self._backend = backend
        self._room = room
        self._subscriber: _Subscriber | None = subscriber

    async def aclose(self) -> None:
        if self._subscriber is not None:
            self._backend._unsubscribe(self._room, self._subscriber)
            self._subscriber = None


class RedisBackend(Backend):
    """Orders, stores and fans out rooms through Redis, for any number of processes.

    Every process (node) opens its own ``RedisBackend`` on the same Redis. A room's seq is
    assigned by a Lua script that increments the room's counter and appends the envelope to
    the room's stream in one step; each node's reader delivers a room's stream to the local
    listeners in seq order, resuming where it stopped after a reconnect. History is the
    stream, trimmed to at least ``history_size`` envelopes, so ``since`` resume works on any
    node. Presence counts connections per (room, client, node); a node's entries stop
    counting when its heartbeat key expires (``presence_ttl`` seconds after its last beat),
    and a surviving node then announces the ``leave`` events.

    asyncio only (redis-py's client is). Use it as ``async with`` (a ``ConnectionManager``
    does that): it runs a reader and a heartbeat task until it exits. If Redis is
    unreachable, it keeps retrying with exponential backoff, :meth:`health` says
    ``degraded``, and publishing raises :class:`~wsbroadcast.exceptions.BackendUnavailable`.

    :param url: ``redis://host:port/db`` or ``rediss://...``, passed to redis-py.
    :param prefix: prepended to every key, so several applications can share a database.
    :param history_size: envelopes kept per room, at least (trimming is approximate unless
        ``exact_trim``). It also bounds how long a node's reader may be cut off from Redis
        before it misses envelopes.
    :param exact_trim: trim streams to exactly ``history_size`` (costs more CPU in Redis).
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
            raise InvalidBackendURL(f"history size must be >= 1, not {history_size}")
        if not 0 < heartbeat_interval < presence_ttl:
            raise InvalidBackendURL(
                f"need 0 < heartbeat_interval ({heartbeat_interval}) "
                f"< presence_ttl ({presence_ttl})"
            )
        for name, value in (
            ("block_timeout", block_timeout),
            ("command_timeout", command_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise InvalidBackendURL(f"{name} must be positive, not {value}")
        if read_count < 1:
            raise InvalidBackendURL(f"read_count must be >= 1, not {read_count}")
        if max_connections < 1:
            raise InvalidBackendURL(f"max_connections must be >= 1, not {max_connections}")
        self.url = url
        self.prefix = prefix
        self.history_size = history_size
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
        self._rooms: dict[str, _Room] = {}
        self._presence: Counter[tuple[str, str]] = Counter()
        self._wake_id = "0-0"
        self._generation: str | None = None
        self._generation_version = 0
        self._connected = False
        self._ever_connected = False
        self._outage_logged = False
        self._resync_pending = False
        self._resyncing: anyio.Event | None = None
        self._presence_changes = 0
        self._presence_idle: anyio.Event | None = None
        self._reconnects = 0
        self._last_error: str | None = None
        self._data_losses = 0
        self._gaps = 0
        self._publish_failures = 0
        self._reaped_nodes = 0

    @classmethod
    def from_url(cls, url: str) -> RedisBackend:
        """Build from ``redis://host:port/db?history=N&prefix=P&presence_ttl=S&heartbeat=S``.

        Those four options are ours; any other query option is passed on to redis-py.
        """
        parts = urlsplit(url)
        ours: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        converters = {
            "history": ("history_size", int),
            "prefix": ("prefix", str),
            "presence_ttl": ("presence_ttl", float),
            "heartbeat": ("heartbeat_interval", float),
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

    # -- keys

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _log_key(self, room: str) -> str:
        return self._key("room", room, "log")

    # -- lifecycle

    async def __aenter__(self) -> RedisBackend:
        if self._task_group is not None:
            raise RuntimeError("a RedisBackend can only be entered once")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "RedisBackend runs on asyncio only (redis-py's client does)"
            ) from None
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
        self._redis = Redis.from_pool(pool)
        # The reader's socket timeout outlasts its blocking XREAD, so a dead link still fails.
        self._reader = Redis.from_url(
            self.url, socket_timeout=self.block_timeout + self.command_timeout, **options
        )
        self._publish_script = self._redis.register_script(_PUBLISH)
        self._ensure_generation_script = self._redis.register_script(_ENSURE_GENERATION)
        self._add_presence_script = self._redis.register_script(_ADD_PRESENCE)
        self._restore_presence_script = self._redis.register_script(_RESTORE_PRESENCE)
        self._remove_presence_script = self._redis.register_script(_REMOVE_PRESENCE)
        self._reap_presence_script = self._redis.register_script(_REAP_PRESENCE)
        self._presence_script = self._redis.register_script(_PRESENCE)
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT)
        try:
            await self._heartbeat()
            await self._sync_generation()
        except _UNREACHABLE as exc:
            self._mark_down(exc)
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._run_reader)
        task_group.start_soon(self._run_heartbeat)
        return self

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
        await self._redis.delete(self._key("node", self.node_id), self._wake_key)

    @property
    def _wake_key(self) -> str:
        return self._key("node", self.node_id, "wake")

    def _client(self) -> Redis:
        if self._redis is None or self._task_group is None:
            raise RuntimeError("use the RedisBackend inside 'async with' (the manager does)")
        return self._redis

    # -- health

    def health(self) -> dict[str, JsonValue]:
        """Status for ``/healthz`` and metrics: ``degraded`` while Redis cannot be reached.

        ``reconnects`` counts recoveries after an outage, ``data_losses`` the times Redis came
        back without its data, ``gaps`` the times the reader found envelopes already trimmed.
        """
        return {
            "status": "ok" if self._connected else "degraded",
            "backend": type(self).__name__,
            "node_id": self.node_id,
            "connected": self._connected,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "rooms": len(self._rooms),
            "data_losses": self._data_losses,
            "gaps": self._gaps,
            "publish_failures": self._publish_failures,
            "reaped_nodes": self._reaped_nodes,
        }

    def _mark_down(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._resync_pending = True
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning("Redis unreachable (%s); retrying with backoff", self._last_error)
        self._connected = False

    def _mark_up(self) -> None:
        if not self._connected:
            if self._ever_connected:
                self._reconnects += 1
                logger.warning(
                    "Redis reachable again; reading %d rooms from where they stopped",
                    len(self._rooms),
                )
            self._connected = True
            self._ever_connected = True
            self._outage_logged = False

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        return float(delay / 2 + random.uniform(0, delay / 2))

    def _unavailable(self, what: str, exc: BaseException) -> BackendUnavailable:
        self._mark_down(exc)
        return BackendUnavailable(f"Redis unreachable, could not {what}: {exc}")

    @contextmanager
    def _commands(self, what: str) -> Iterator[None]:
        """Turn redis-py's errors into ours: unreachable -> BackendUnavailable, refused ->
        BackendError, so no redis-py exception ever reaches the manager or the application."""
        try:
            yield
        except _UNREACHABLE as exc:
            raise self._unavailable(what, exc) from exc
        except RedisError as exc:
            raise BackendError(f"Redis refused to {what}: {exc}") from exc

    # -- generation (detects a Redis that came back empty)

    async def _sync_generation(self) -> None:
        assert self._redis is not None
        known = self._generation
        base = time.time_ns() // 1000 if known else 0
        raw = await self._ensure_generation_script(
            keys=[self._key("generation")], args=[uuid.uuid4().hex, base, known or ""]
        )
        generation = str(raw[0])
        if self._generation is None:
            self._generation = generation
        elif generation != self._generation:
            self._lost_data(generation)

    def _lost_data(self, generation: str) -> None:
        logger.warning(
            "Redis lost its data (generation %s is now %s): history before now is gone, "
            "resuming clients are told so, and rooms continue with higher seqs",
            self._generation,
            generation,
        )
        self._generation = generation
        self._generation_version += 1
        self._data_losses += 1
        for room in self._rooms.values():
            room.position = "0-0"
            room.last_seq = 0
            for subscriber in room.subscribers:
                subscriber.start = 0

    # -- publish and history

    async def publish_draft(self, draft: Draft) -> Envelope:
        """Number and append the envelope in one Lua script; local delivery is the reader's.

        A publish whose connection fails is retried once on a fresh connection; a receipt
        keyed by the envelope id (kept ``2 * command_timeout`` seconds) makes the retry a
        no-op if the first attempt did reach Redis, so nothing is published twice. Raises
        :class:`~wsbroadcast.exceptions.BackendUnavailable` if both attempts fail. In the
        rare case that both replies were lost after Redis ran the script, the envelope was
        published although this raised: never silently lost, at worst reported lost.
        """
        client = self._client()
        room = draft.room
        keys = [
            self._key("generation"),
            self._key("room", room, "seq"),
            self._log_key(room),
            self._key("receipt", draft.id),
        ]
        trim = "=" if self.exact_trim else "~"
        receipt_ms = int(2000 * self.command_timeout)
        unreachable: BaseException | None = None
        result: Any = None
        try:
            for _ in range(4):
                try:
                    if self._generation is None:
                        await self._sync_generation()
                    result = await self._publish_script(
                        keys=keys,
                        args=[
                            self._generation or "",
                            self.history_size,
                            trim,
                            draft.head,
                            f',"epoch":"{self._generation or ""}{draft.tail}',
                            receipt_ms,
                        ],
                        client=client,
                    )
                except _UNREACHABLE as exc:
                    if unreachable is not None:
                        raise
                    unreachable = exc
                    continue
                if result[0] == "OK":
                    break
                await self._sync_generation()
            else:
                raise BackendError("the Redis generation kept changing during a publish")
        except _UNREACHABLE as exc:
            self._publish_failures += 1
            raise self._unavailable(f"publish to {room!r}", exc) from exc
        except RedisError as exc:
            self._publish_failures += 1
            raise BackendError(f"Redis refused the publish to {room!r}: {exc}") from exc
        return draft.envelope(int(result[1]), self._generation or "")

    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        """Read the room's counter and stream in one transaction: all or nothing."""
        client = self._client()
        with self._commands(f"read the history of {room!r}"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(self._key("room", room, "seq"))
                pipe.xrange(self._log_key(room), min=f"{since + 1}-0", max="+")
                pipe.xrange(self._log_key(room), count=1)
                raw_seq, entries, oldest = await pipe.execute()
        last = int(raw_seq or 0)
        first = _entry_seq(oldest[0][0]) if oldest else last + 1
        current = self._generation or ""
        complete = first - 1 <= since <= last and (since == 0 or epoch in (None, current))
        envelopes: tuple[Envelope, ...] = ()
        if complete and since < last:
            envelopes = tuple(Envelope.from_text(entry["e"]) for _, entry in entries)
        return History(room, since, complete, last, first, envelopes, current if last else "")

    # -- subscriptions and the reader

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        """Register ``listener``; it gets the envelopes numbered after the room's current seq."""
        client = self._client()
        with self._commands(f"subscribe to {room!r}"):
            current = int(await client.get(self._key("room", room, "seq")) or 0)
        state = self._rooms.get(room)
        created = state is None
        if state is None:
            state = self._rooms[room] = _Room(current)
        subscriber = _Subscriber(listener, max(current, state.last_seq))
        state.subscribers.append(subscriber)
        if created:
            try:
                with self._commands(f"subscribe to {room!r}"):
                    await client.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            except BackendError:
                self._unsubscribe(room, subscriber)
                raise
        return _RedisSubscription(self, room, subscriber)

    def _unsubscribe(self, room: str, subscriber: _Subscriber) -> None:
        state = self._rooms.get(room)
        if state is None or subscriber not in state.subscribers:
            return
        state.subscribers.remove(subscriber)
        if not state.subscribers:
            # The reader drops the room from its XREAD the next time it re-arms.
            del self._rooms[room]

    async def _run_reader(self) -> None:
        assert self._reader is not None
        reader = self._reader
        failures = 0
        while True:
            rooms = dict(self._rooms)
            version = self._generation_version
            streams: dict[Any, Any] = {self._wake_key: self._wake_id}
            by_key: dict[str, str] = {}
            for name, state in rooms.items():
                key = self._log_key(name)
                streams[key] = state.position
                by_key[key] = name
            try:
                if self._generation is None:
                    await self._sync_generation()
                async with reader.pipeline(transaction=False) as pipe:
                    pipe.hget(self._key("generation"), "id")
                    pipe.xread(streams, count=self.read_count, block=int(self.block_timeout * 1000))
                    generation, response = await pipe.execute()
                if generation != self._generation:
                    await self._sync_generation()
            except _UNREACHABLE as exc:
                self._mark_down(exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            except RedisError as exc:
                logger.error("Redis refused the reader's XREAD: %r", exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            failures = 0
            self._mark_up()
            if version != self._generation_version:
                continue
            for key, entries in response or ():
                if key == self._wake_key:
                    self._wake_id = entries[-1][0]
                    continue
                name = by_key[key]
                state = rooms[name]
                if self._rooms.get(name) is state:
                    self._deliver(name, state, entries)

    def _deliver(
        self, room: str, state: _Room, entries: list[tuple[str, Mapping[str, str]]]
    ) -> None:
        for entry_id, entry in entries:
            seq = _entry_seq(entry_id)
            state.position = entry_id
            if seq <= state.last_seq:
                continue
            if state.last_seq and seq != state.last_seq + 1:
                self._gaps += 1
                logger.warning(
                    "room %r: envelopes %d to %d were trimmed before this node read them; "
                    "its listeners see a gap in seq",
                    room,
                    state.last_seq + 1,
                    seq - 1,
                )
            state.last_seq = seq
            try:
                envelope = Envelope.from_text(entry["e"])
            except (KeyError, ValueError):
                logger.exception("room %r: entry %s is not an envelope; skipped", room, entry_id)
                continue
            for subscriber in tuple(state.subscribers):
                if seq > subscriber.start:
                    try:
                        subscriber.listener(envelope)
                    except Exception:
                        logger.exception("listener for room %r failed; it is skipped", room)

    # -- presence

    def _presence_keys(self, room: str, client_id: str) -> list[str]:
        return [
            self._key("room", room, "client", client_id),
            self._key("room", room, "members"),
            self._key("node", self.node_id, "presence"),
        ]

    def _presence_args(self, room: str, client_id: str) -> list[str]:
        return [self.node_id, client_id, f"{room} {client_id}", self._key("node", "")]

    async def add_presence(self, room: str, client_id: str) -> bool:
        """Count a connection of ``client_id`` on this node; true if no live node had one."""
        client = self._client()
        async with self._presence_change():
            # Counted locally first, so that a resync never takes it for a stale entry.
            self._presence[room, client_id] += 1
            try:
                with self._commands(f"add presence in {room!r}"):
                    first = await self._add_presence_script(
                        keys=self._presence_keys(room, client_id),
                        args=self._presence_args(room, client_id),
                        client=client,
                    )
            except BaseException:
                self._discount(room, client_id)
                raise
        return bool(first)

    async def remove_presence(self, room: str, client_id: str) -> bool:
        """Count one connection less on this node; true if no live node holds one any more.

        The local count drops even if Redis cannot be reached (the connection is gone); the
        resync after the outage removes what Redis still holds and announces the leave.
        """
        client = self._client()
        async with self._presence_change():
            if not self._discount(room, client_id):
                return False
            with self._commands(f"remove presence in {room!r}"):
                last = await self._remove_presence_script(
                    keys=self._presence_keys(room, client_id),
                    args=self._presence_args(room, client_id),
                    client=client,
                )
        return bool(last)

    def _discount(self, room: str, client_id: str) -> bool:
        key = (room, client_id)
        if self._presence[key] <= 0:
            del self._presence[key]
            return False
        self._presence[key] -= 1
        if not self._presence[key]:
            del self._presence[key]
        return True

    @asynccontextmanager
    async def _presence_change(self) -> AsyncIterator[None]:
        """Let presence changes run concurrently with each other, but not with a resync."""
        while self._resyncing is not None:
            await self._resyncing.wait()
        self._presence_changes += 1
        try:
            yield
        finally:
            self._presence_changes -= 1
            if not self._presence_changes and self._presence_idle is not None:
                self._presence_idle.set()

    @asynccontextmanager
    async def _presence_resync(self) -> AsyncIterator[None]:
        """Hold presence changes off, and wait for those in flight, while resyncing."""
        while self._resyncing is not None:
            await self._resyncing.wait()
        done = self._resyncing = anyio.Event()
        try:
            while self._presence_changes:
                idle = self._presence_idle = anyio.Event()
                await idle.wait()
            yield
        finally:
            self._resyncing = None
            done.set()

    async def presence(self, room: str) -> list[str]:
        """The clients with a connection on a node whose heartbeat has not expired."""
        client = self._client()
        with self._commands(f"read presence in {room!r}"):
            members = await self._presence_script(
                keys=[self._key("room", room, "members")],
                args=[self._key("room", room, "client", ""), self._key("node", "")],
                client=client,
            )
        return sorted(str(member) for member in members)

    async def _heartbeat(self) -> bool:
        """Refresh this node's heartbeat; return whether it had expired (or Redis was empty)."""
        assert self._redis is not None
        existed = await self._heartbeat_script(
            keys=[self._key("node", self.node_id), self._key("nodes")],
            args=[int(self.presence_ttl * 1000), self.node_id],
        )
        self._mark_up()
        return not existed

    async def _run_heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                if await self._heartbeat():
                    self._resync_pending = True
                if self._resync_pending:
                    await self._resync_presence()
                    self._resync_pending = False
                await self._reap_dead_nodes()
            except _UNREACHABLE as exc:
                self._mark_down(exc)
            except (BackendError, RedisError) as exc:
                logger.warning("heartbeat of node %s failed: %r", self.node_id, exc)

    async def _resync_presence(self) -> None:
        """Make Redis hold exactly this node's connections again, after an outage.

        A ``remove_presence`` that failed while Redis was unreachable left a count behind,
        and a heartbeat that expired (or a Redis that lost its data) dropped ours: entries
        Redis has but this node does not are removed (announcing ``leave`` if the client is
        gone everywhere), entries this node has are written back (announcing ``join`` if the
        client was nowhere).
        """
        async with self._presence_resync():
            await self._resync_presence_now()

    async def _resync_presence_now(self) -> None:
        assert self._redis is not None
        index = self._key("node", self.node_id, "presence")
        held = {str(entry) for entry in await self._redis.smembers(index)}
        local = {f"{room} {client_id}" for room, client_id in self._presence}
        for entry in sorted(held - local):
            if await self._reap(self.node_id, entry, check_alive=False) == 1:
                room, _, client_id = entry.partition(" ")
                await self.publish(room, "leave", client_id)
        for (room, client_id), count in tuple(self._presence.items()):
            first = await self._restore_presence_script(
                keys=self._presence_keys(room, client_id),
                args=[*self._presence_args(room, client_id), count],
            )
            if first:
                await self.publish(room, "join", client_id)

    async def _reap(self, node: str, entry: str, *, check_alive: bool) -> int:
        room, _, client_id = entry.partition(" ")
        keys = self._presence_keys(room, client_id)[:2]
        keys += [self._key("node", node, "presence"), self._key("node", node)]
        result = await self._reap_presence_script(
            keys=keys,
            args=[node, client_id, entry, self._key("node", ""), "1" if check_alive else "0"],
        )
        return int(result)

    async def _reap_dead_nodes(self) -> None:
        """Remove what dead nodes held in presence and announce their clients' leaves.

        Each entry is removed by one node only, so each leave is announced once; the node
        that then removes the dead node from the nodes set counts it as reaped.
        """
        assert self._redis is not None
        nodes = sorted(str(node) for node in await self._redis.smembers(self._key("nodes")))
        others = [node for node in nodes if node != self.node_id]
        if not others:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for node in others:
                pipe.exists(self._key("node", node))
            flags = await pipe.execute()
        for node, alive in zip(others, flags, strict=True):
            if alive:
                continue
            index = self._key("node", node, "presence")
            entries = sorted(str(entry) for entry in await self._redis.smembers(index))
            leaves = 0
            for entry in entries:
                result = await self._reap(node, entry, check_alive=True)
                if result == -1:
                    break  # it beat again: alive after all
                if result == 1:
                    room, _, client_id = entry.partition(" ")
                    await self.publish(room, "leave", client_id)
                    leaves += 1
            else:
                if await self._redis.srem(self._key("nodes"), node):
                    self._reaped_nodes += 1
                    await self._redis.delete(index, self._key("node", node, "wake"))
                    logger.log(
                        logging.WARNING if entries else logging.INFO,
                        "node %s stopped beating: removed its presence (%d leaves announced)",
                        node,
                        leaves,
                    )


def _entry_seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])
