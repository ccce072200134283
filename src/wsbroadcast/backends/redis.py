"""The Redis backend: many processes on many machines share one order, history and presence.

Everything that must be agreed on lives in Redis and is changed by Lua scripts, so two nodes
can never hand out the same or out-of-order numbers. Key layout (``P`` is the prefix,
``wsbroadcast:`` by default; every ``room:`` key expires ``history_ttl`` after the room was
last used)::

    P generation                      hash {id}: who this Redis's data belongs to
    P room:<room>:stream              hash {seq, epoch, bytes}: the room's stream and counter
    P room:<room>:log                 stream: entry id "<seq>-0", field "e" = envelope JSON
    P room:<room>:members             set of client ids that may be present
    P room:<room>:client:<client>     hash node id -> connections of the client on that node
    P room:<room>:receipt:<id>        "<seq> <epoch>" of a publish, for a few seconds
    P nodes                           set of node ids that may be alive
    P node:<id>                       heartbeat, expires after ``presence_ttl``
    P node:<id>:presence              set of "<room> <client>" the node holds (for the reaper)
    P node:<id>:wake                  stream the node's reader blocks on to be re-armed
    P rate:<key>                      hash {tokens, at}: a token bucket of ``allow``

``<room>`` and ``<client>`` are the names with every ``:`` written ``%3A`` (``%`` is not a
name character, so this is one to one, and names without ``:`` are written as they are):
a key always splits on ``:`` into the parts above, so room ``x`` with client ``y:log`` and
room ``x:client:y`` never share a key. Nothing parses a name out of a key; the presence
index's ``"<room> <client>"`` entries hold the names themselves (no name has a space).

One reader task per backend does a single blocking ``XREAD`` over the logs of the rooms with
local listeners (and its wake stream), and calls the listeners in seq order, or tells them a
:class:`~wsbroadcast.backend.StreamReset` first when it cannot. See ``docs/backends.md`` for
the guarantees, their costs and the behaviour on each fault.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any, TypeVar
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

from ..backend import Backend, History, Listener, ResetListener, StreamReset, Subscription
from ..envelope import Draft, Envelope, new_epoch
from ..exceptions import BackendError, BackendUnavailable, InvalidBackendURL, InvalidInput

__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_HISTORY_BYTES",
    "DEFAULT_HISTORY_TTL",
    "RedisBackend",
]

logger = logging.getLogger("wsbroadcast.backends.redis")

DEFAULT_HISTORY = 1000
"""Envelopes kept per room, at least (see ``exact_trim``)."""
DEFAULT_HISTORY_BYTES = 4 * 1024 * 1024
"""Bytes of envelopes (their wire form) kept per room, at most."""
DEFAULT_HISTORY_TTL = 600.0
"""Seconds a room with nobody in it is remembered after it was last used."""
DEFAULT_PREFIX = "wsbroadcast:"

_APPROXIMATE_SLACK = 100
"""Without ``exact_trim``, a log is trimmed back to ``history_size`` once it holds this many
more: one trim per 100 publishes instead of one per publish."""
_MAX_SEQ = 2**63
"""Redis counters are signed 64-bit: no seq reaches this."""
_CHECK_CHUNK = 500
"""Rooms per script call when checking and refreshing rooms (bounds how long Redis is busy)."""

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

_T = TypeVar("_T")

# KEYS: stream hash, log, members, receipt. ARGV: candidate epoch (used only if the room has
# no stream), max entries, slack, max bytes, text head, text tail, receipt ttl (ms), room ttl
# (ms, 0 = never). The seq and epoch are spliced into the text here, so the stored text is
# final. The receipt (envelope id -> "seq epoch") makes a retried publish a no-op. The log is
# trimmed, oldest first, while it holds more than max entries (+ slack) or max bytes, but
# never below its newest entry, which every node's reader must still be able to read.
_PUBLISH = """
local done = redis.call('GET', KEYS[4])
if done then return done end
local meta = redis.call('HMGET', KEYS[1], 'seq', 'epoch', 'bytes')
local epoch, seq, bytes = meta[2], tonumber(meta[1] or '0'), tonumber(meta[3] or '0')
if not epoch then
  epoch, seq, bytes = ARGV[1], 0, 0
  -- A log left by a forgotten stream is not this one's. (Only deleted if it exists: after a
  -- first write, Redis lets a script write past maxmemory, and XADD must be refused then.)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DEL', KEYS[2]) end
end
seq = seq + 1
local id = string.format('%d', seq)
local text = ARGV[5] .. id .. ',"epoch":"' .. epoch .. ARGV[6]
local added = redis.pcall('XADD', KEYS[2], id .. '-0', 'e', text)
if type(added) == 'table' and added.err then
  if not string.find(added.err, 'equal or smaller', 1, true) then
    return redis.error_reply(added.err)
  end
  -- The log holds entries this counter does not know: it is not this stream's any more.
  epoch, seq, bytes, id = ARGV[1], 1, 0, '1'
  text = ARGV[5] .. id .. ',"epoch":"' .. epoch .. ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], '1-0', 'e', text)
end
bytes = bytes + #text
local maxn, maxb = tonumber(ARGV[2]), tonumber(ARGV[4])
local n = redis.call('XLEN', KEYS[2])
local excess = 0
if n > maxn + tonumber(ARGV[3]) then excess = n - maxn end
if excess > 0 or bytes > maxb then
  local from, keep = '-', nil
  while (excess > 0 or bytes > maxb) and n > 1 do
    local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 100)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if not ((excess > 0 or bytes > maxb) and n > 1) then break end
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'e' then bytes = bytes - #fields[i + 1] end
      end
      excess, n = excess - 1, n - 1
      keep = string.format('%d', tonumber(string.match(entry[1], '^(%d+)')) + 1) .. '-0'
    end
    from = keep
  end
  if keep then redis.call('XTRIM', KEYS[2], 'MINID', keep) end
  if n <= 1 then bytes = #text end
end
redis.call('HSET', KEYS[1], 'seq', id, 'epoch', epoch, 'bytes', bytes)
local ttl = tonumber(ARGV[8])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
local receipt = id .. ' ' .. epoch
redis.call('SET', KEYS[4], receipt, 'PX', ARGV[7])
return receipt
"""

# KEYS: generation. ARGV: candidate id. Returns the id of this Redis's data.
_ENSURE_GENERATION = """
redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
return redis.call('HGET', KEYS[1], 'id')
"""

# Checks (and keeps alive) the rooms this node reads or holds presence in. ARGV: room ttl
# (ms, 0 = never), room key prefix, then per room five values: room (as written in its keys,
# see _key_part), the epoch this node reads ('' = no stream known yet, '-' = only refresh the
# TTL), the last seq it delivered, the id of that envelope ('' = unknown), a candidate epoch.
# A stream this node was reading that is gone, or whose counter went back below what it
# delivered, or whose entry at that seq is another envelope (Redis restored from an older
# snapshot), is given the candidate epoch atomically, so every node resets to the same new
# stream. Returns epoch, seq per room.
_CHECK_ROOMS = """
local ttl, prefix, out = tonumber(ARGV[1]), ARGV[2], {}
for i = 3, #ARGV, 5 do
  local base = prefix .. ARGV[i]
  local meta_key, log_key = base .. ':stream', base .. ':log'
  if ttl > 0 then
    redis.call('PEXPIRE', meta_key, ttl)
    redis.call('PEXPIRE', log_key, ttl)
    redis.call('PEXPIRE', base .. ':members', ttl)
  end
  local expected, last, last_id = ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  if expected == '-' then
    out[#out + 1] = ''
    out[#out + 1] = '0'
  else
    local meta = redis.call('HMGET', meta_key, 'seq', 'epoch')
    local epoch, seq = meta[2], tonumber(meta[1] or '0')
    local renew = false
    if expected ~= '' then
      if not epoch then
        renew = true
      elseif epoch == expected then
        if seq < last then
          renew = true
        elseif last > 0 and last_id ~= '' then
          local at = string.format('%d', last) .. '-0'
          local entry = redis.call('XRANGE', log_key, at, at)
          if entry[1] then
            local fields = entry[1][2]
            if fields[2] == nil or not string.find(fields[2], last_id, 1, true) then
              renew = true
            end
          end
        end
      end
    end
    if renew then
      epoch, seq = ARGV[i + 4], 0
      redis.call('DEL', log_key)
      redis.call('HSET', meta_key, 'seq', '0', 'epoch', epoch, 'bytes', '0')
      if ttl > 0 then redis.call('PEXPIRE', meta_key, ttl) end
    end
    out[#out + 1] = epoch or ''
    out[#out + 1] = string.format('%d', seq)
  end
end
return out
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
local function keep(ttl, a, b)
  if tonumber(ttl) > 0 then
    redis.call('PEXPIRE', a, ttl)
    redis.call('PEXPIRE', b, ttl)
  end
end
"""

# KEYS: client hash, members set, node index. ARGV: node id, client, index entry, node
# prefix, room ttl (ms, 0 = never), node keys ttl (ms).
_ADD_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
keep(ARGV[5], KEYS[1], KEYS[2])
if n > 1 or other_live_node(KEYS[1], ARGV[1], ARGV[4]) then return 0 end
return 1
"""
)

# Same KEYS and ARGV as _ADD_PRESENCE; ARGV[7] is the count to restore.
_RESTORE_PRESENCE = (
    _OTHER_LIVE_NODE
    + """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[7])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
keep(ARGV[5], KEYS[1], KEYS[2])
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

# KEYS: members set. ARGV: client hash prefix, node prefix. Read-only. The members are client
# ids; their hashes' keys write ':' as '%3A' (see _key_part).
_PRESENCE = """
local out, alive = {}, {}
for _, client in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. (string.gsub(client, ':', '%%3A')))
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

# KEYS: heartbeat key, nodes set, node index, wake stream, generation. ARGV: presence ttl
# (ms), node id, node keys ttl (ms), room ttl (ms, 0 = never), then the keys of the client
# hashes this node holds, which it keeps alive. Returns whether the heartbeat key existed,
# and the generation id ('' if none).
_HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 5, #ARGV do redis.call('PEXPIRE', ARGV[i], ttl) end
end
return {existed, redis.call('HGET', KEYS[5], 'id') or ''}
"""

# KEYS: bucket. ARGV: rate (tokens per second), burst. A token bucket on Redis's clock, so
# every node shares it; it expires once it would be full again.
_ALLOW = """
if redis.replicate_commands then redis.replicate_commands() end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
if not tokens or not at then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return allowed
"""


class _Subscriber:
    __slots__ = ("listener", "on_reset", "start")

    def __init__(self, listener: Listener, on_reset: ResetListener | None, start: int) -> None:
        self.listener = listener
        self.on_reset = on_reset
        self.start = start
        """Envelopes with ``seq <= start`` were published before ``subscribe`` returned."""


class _Room:
    """What this node's reader knows of one room's stream."""

    __slots__ = ("epoch", "last_id", "last_seq", "position", "subscribers", "version")

    def __init__(self, epoch: str, last_seq: int) -> None:
        self.subscribers: list[_Subscriber] = []
        self.epoch = epoch
        """The stream being read ("" until the room has one)."""
        self.last_seq = last_seq
        """The last seq handled (delivered, or told as a gap)."""
        self.last_id = ""
        """The envelope id of ``last_seq`` if it was delivered (to detect a rolled-back log)."""
        self.position = f"{last_seq}-0"
        """The stream id the reader reads after: the last entry it handled."""
        self.version = 0
        """Bumped when the stream restarts, so that reads begun before are discarded."""


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
    unreachable, it keeps retrying with exponential backoff, :meth:`health` says
    ``degraded``, and publishing raises :class:`~wsbroadcast.exceptions.BackendUnavailable`.

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
            raise InvalidBackendURL(f"history size must be >= 1, not {history_size}")
        if history_bytes < 1:
            raise InvalidBackendURL(f"history_bytes must be >= 1, not {history_bytes}")
        if not 0 < heartbeat_interval < presence_ttl:
            raise InvalidBackendURL(
                f"need 0 < heartbeat_interval ({heartbeat_interval}) "
                f"< presence_ttl ({presence_ttl})"
            )
        if history_ttl is not None and not history_ttl > 2 * heartbeat_interval:
            raise InvalidBackendURL(
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
                raise InvalidBackendURL(f"{name} must be positive, not {value}")
        if read_count < 1:
            raise InvalidBackendURL(f"read_count must be >= 1, not {read_count}")
        if max_connections < 1:
            raise InvalidBackendURL(f"max_connections must be >= 1, not {max_connections}")
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
        self._rooms: dict[str, _Room] = {}
        self._presence: Counter[tuple[str, str]] = Counter()
        self._wake_id = "0-0"
        self._generation: str | None = None
        self._connected = False
        self._ever_connected = False
        self._outage_logged = False
        self._last_reply: float | None = None
        self._write_refused: str | None = None
        self._resync_pending = False
        self._check_pending = False
        self._generation_unsure = False
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

    def _room_key(self, room: str, *parts: str) -> str:
        """A key of ``room``: its name with ``:`` escaped, then ``parts`` as they are."""
        return self._key("room", _key_part(room), *parts)

    def _client_key(self, room: str, client_id: str) -> str:
        return self._room_key(room, "client", _key_part(client_id))

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
        self._check_rooms_script = self._redis.register_script(_CHECK_ROOMS)
        self._add_presence_script = self._redis.register_script(_ADD_PRESENCE)
        self._restore_presence_script = self._redis.register_script(_RESTORE_PRESENCE)
        self._remove_presence_script = self._redis.register_script(_REMOVE_PRESENCE)
        self._reap_presence_script = self._redis.register_script(_REAP_PRESENCE)
        self._presence_script = self._redis.register_script(_PRESENCE)
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT)
        self._allow_script = self._redis.register_script(_ALLOW)
        try:
            await self._heartbeat()
            await self._sync_generation()
        except _UNREACHABLE as exc:
            self._mark_down(exc)
        except RedisError as exc:
            self._mark_refused(exc)
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

    def _client(self) -> Redis:
        if self._redis is None or self._task_group is None:
            raise RuntimeError("use the RedisBackend inside 'async with' (the manager does)")
        return self._redis

    # -- health

    def health(self) -> dict[str, JsonValue]:
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
        return {
            "status": "degraded" if degraded else "ok",
            "backend": type(self).__name__,
            "node_id": self.node_id,
            "connected": self._connected,
            "responsive": self._connected and not stale,
            "writable": self._write_refused is None,
            "reconnects": self._reconnects,
            "last_error": self._last_error,
            "rooms": len(self._rooms),
            "data_losses": self._data_losses,
            "resets": self._resets,
            "gaps": self._gaps,
            "publish_failures": self._publish_failures,
            "reaped_nodes": self._reaped_nodes,
        }

    def _stale(self) -> bool:
        """True if Redis answered nothing for longer than a healthy node ever waits."""
        if self._last_reply is None:
            return True
        silence = time.monotonic() - self._last_reply
        return silence > self.heartbeat_interval + self.command_timeout

    def _mark_down(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._resync_pending = True
        self._check_pending = True
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
        except _UNREACHABLE as exc:
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

    async def _sync_generation(self) -> None:
        assert self._redis is not None
        raw = await self._ensure_generation_script(
            keys=[self._key("generation")], args=[uuid.uuid4().hex]
        )
        self._mark_up()
        self._generation_unsure = False
        self._adopt_generation(str(raw))

    def _adopt_generation(self, generation: str) -> None:
        """Remember Redis's generation; a different one than before means it lost its data.

        The rooms are then checked (before the reader's next read): each room whose stream
        is gone or restarted gets a :class:`StreamReset` and is read from its new start.
        """
        if self._generation is None:
            self._generation = generation
        elif generation != self._generation:
            logger.warning(
                "Redis lost its data (generation %s is now %s): listeners of %d rooms are "
                "told their stream was reset, resuming clients are told history is lost",
                self._generation,
                generation,
                len(self._rooms),
            )
            self._generation = generation
            self._data_losses += 1
            self._check_pending = True
            self._resync_pending = True

    # -- publish and history

    async def publish_draft(self, draft: Draft) -> Envelope:
        """Number and append the envelope in one Lua script; local delivery is the reader's.

        The room's stream gets a fresh epoch if it has none (a new or forgotten room, or a
        Redis that lost it): seq starts at 1 in it. A publish whose connection fails is
        retried once on a fresh connection; a receipt keyed by the envelope id (kept
        ``2 * command_timeout`` seconds) makes the retry a no-op if the first attempt did
        reach Redis, so nothing is published twice. Raises
        :class:`~wsbroadcast.exceptions.BackendUnavailable` if both attempts fail. In the
        rare case that both replies were lost after Redis ran the script, the envelope was
        published although this raised: never silently lost, at worst reported lost.
        """
        client = self._client()
        room = draft.room
        keys = [
            self._stream_key(room),
            self._log_key(room),
            self._room_key(room, "members"),
            # Per room: a direct message is one id published in two personal streams.
            self._room_key(room, "receipt", draft.id),
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
            except _UNREACHABLE:
                result = await self._publish_script(keys=keys, args=args, client=client)
        except _UNREACHABLE as exc:
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
                pipe.hmget(self._stream_key(room), "seq", "epoch")
                pipe.xrange(self._log_key(room), count=1)
                if readable:
                    pipe.xrange(self._log_key(room), min=f"{since + 1}-0", max="+")
                results = await pipe.execute()
        (raw_seq, raw_epoch), oldest = results[0], results[1]
        entries: list[tuple[str, Mapping[str, str]]] = results[2] if readable else []
        if raw_epoch is None:
            return History(room, since, complete=since == 0, last_seq=0, first_seq=1)
        stream_epoch = str(raw_epoch)
        last = int(raw_seq or 0)
        first = _entry_seq(oldest[0][0]) if oldest else last + 1
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
        full again. Raises :class:`~wsbroadcast.exceptions.BackendUnavailable` if Redis
        cannot be reached: the caller decides whether to fail open (let the message through,
        perhaps under a local :meth:`Backend.allow` bucket) or closed (refuse it).
        """
        if not (rate > 0 and burst >= 1 and math.isfinite(rate) and math.isfinite(burst)):
            raise InvalidInput(f"need rate > 0 and burst >= 1, not {rate} and {burst}")
        client = self._client()
        with self._commands("take a rate-limit token", write=True):
            allowed = await self._allow_script(
                keys=[self._key("rate", key)],
                args=[repr(float(rate)), repr(float(burst))],
                client=client,
            )
        return bool(allowed)

    # -- subscriptions and the reader

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        """Register ``listener``; it gets the envelopes numbered after the room's current seq.

        ``on_reset`` is called before any envelope that follows a reset of the room's stream
        or a gap in it (see :class:`~wsbroadcast.backend.StreamReset`).
        """
        client = self._client()
        with self._commands(f"subscribe to {room!r}"):
            raw_seq, raw_epoch = await client.hmget(self._stream_key(room), "seq", "epoch")
        current = int(raw_seq or 0) if raw_epoch is not None else 0
        epoch = str(raw_epoch or "")
        state = self._rooms.get(room)
        created = state is None
        if state is None:
            state = self._rooms[room] = _Room(epoch, current)
        start = max(current, state.last_seq) if epoch == state.epoch else state.last_seq
        subscriber = _Subscriber(listener, on_reset, start)
        state.subscribers.append(subscriber)
        if created:
            try:
                with self._commands(f"subscribe to {room!r}"):
                    await self._poke(client)
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
            try:
                if self._generation is None or self._generation_unsure:
                    await self._sync_generation()
                if self._check_pending:
                    # After an outage or a data loss, before reading on: a room whose stream
                    # was lost or rolled back is reset, not read from a stale position.
                    self._check_pending = False
                    try:
                        await self._check_rooms(poke=False)
                    except BaseException:
                        self._check_pending = True
                        raise
                rooms = {name: (state, state.version) for name, state in self._rooms.items()}
                streams: dict[Any, Any] = {self._wake_key: self._wake_id}
                by_key: dict[str, str] = {}
                for name, (state, _) in rooms.items():
                    key = self._log_key(name)
                    streams[key] = state.position
                    by_key[key] = name
                async with reader.pipeline(transaction=False) as pipe:
                    pipe.hget(self._key("generation"), "id")
                    pipe.xread(streams, count=self.read_count, block=int(self.block_timeout * 1000))
                    generation, response = await pipe.execute()
            except _UNREACHABLE as exc:
                self._mark_down(exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            except RedisError as exc:
                self._mark_up()
                if failures == 0:
                    logger.error("Redis refused the reader's XREAD: %r", exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            failures = 0
            self._mark_up()
            if generation != self._generation:
                # Redis lost its data, or another node already noticed and made a new
                # generation, or this read began before this node adopted the new one: the
                # next turn reads it afresh (creating it if it is gone), then checks the rooms.
                self._generation_unsure = True
                continue
            for key, entries in response or ():
                if key == self._wake_key:
                    self._wake_id = entries[-1][0]
                    continue
                name = by_key[key]
                state, version = rooms[name]
                if self._rooms.get(name) is state and state.version == version:
                    self._deliver(name, state, entries)

    def _deliver(
        self, room: str, state: _Room, entries: list[tuple[str, Mapping[str, str]]]
    ) -> None:
        """Hand a room's entries to its listeners in seq order; never skip one silently.

        An entry of another epoch means the stream was restarted under this reader: the
        listeners are reset and the new stream is read from its start. A seq beyond the
        next one (entries trimmed before this node read them) and an entry that cannot be
        parsed are told as a reset with ``after_seq`` = the last seq not delivered.
        """
        for entry_id, entry in entries:
            seq = _entry_seq(entry_id)
            try:
                envelope: Envelope | None = Envelope.from_text(entry["e"])
            except (KeyError, ValueError):
                envelope = None
            if envelope is not None and envelope.epoch != state.epoch:
                if state.epoch:
                    self._restart(room, state, envelope.epoch)
                    return
                state.epoch = envelope.epoch  # the room's first stream since we subscribed
            state.position = entry_id
            if seq <= state.last_seq:
                continue
            if envelope is None or envelope.seq != seq:
                logger.error(
                    "room %r: entry %s is not an envelope of this stream; its listeners are "
                    "told it is lost",
                    room,
                    entry_id,
                )
                self._gaps += 1
                self._tell_reset(room, state, StreamReset(room, state.epoch, seq))
                state.last_seq, state.last_id = seq, ""
                continue
            if seq != state.last_seq + 1:
                self._gaps += 1
                logger.warning(
                    "room %r: envelopes %d to %d were trimmed before this node read them; "
                    "its listeners are told they are lost",
                    room,
                    state.last_seq + 1,
                    seq - 1,
                )
                self._tell_reset(room, state, StreamReset(room, state.epoch, seq - 1))
            state.last_seq, state.last_id = seq, envelope.id
            for subscriber in tuple(state.subscribers):
                if seq > subscriber.start:
                    try:
                        subscriber.listener(envelope)
                    except Exception:
                        logger.exception("listener for room %r failed; it is skipped", room)

    def _restart(self, room: str, state: _Room, epoch: str) -> None:
        """The room's stream is now ``epoch`` (restarted): reset listeners, read it from 1.

        Logged at INFO per room: the data loss that usually causes it is one WARNING.
        """
        logger.info(
            "room %r: its stream %r was lost or restarted as %r; listeners are reset",
            room,
            state.epoch,
            epoch,
        )
        state.version += 1
        state.epoch = epoch
        state.last_seq = 0
        state.last_id = ""
        state.position = "0-0"
        for subscriber in state.subscribers:
            subscriber.start = 0
        self._tell_reset(room, state, StreamReset(room, epoch, 0))

    def _tell_reset(self, room: str, state: _Room, reset: StreamReset) -> None:
        self._resets += 1
        for subscriber in tuple(state.subscribers):
            if subscriber.on_reset is not None:
                try:
                    subscriber.on_reset(reset)
                except Exception:
                    logger.exception("reset listener for room %r failed; it is skipped", room)

    async def _check_rooms(self, *, poke: bool) -> None:
        """Check the stream of every room this node reads, and keep every room it uses alive.

        A stream that is gone, or was rolled back (Redis restored from an older snapshot:
        its counter is below what this node delivered, or its entry at that seq is another
        envelope), is given a new epoch in Redis atomically, and the room is restarted here
        (``on_reset``, then read from seq 1). ``poke`` re-arms the reader's blocked read.
        """
        assert self._redis is not None
        rooms = {name: (state, state.version) for name, state in self._rooms.items()}
        present = {room for room, _ in self._presence} - set(rooms)
        groups: list[list[str]] = []
        for name, (state, _) in rooms.items():
            part = _key_part(name)
            groups.append([part, state.epoch, str(state.last_seq), state.last_id, new_epoch()])
        groups.extend([_key_part(name), "-", "0", "", ""] for name in sorted(present))
        if not groups:
            return
        results: list[str] = []
        for start in range(0, len(groups), _CHECK_CHUNK):
            chunk = groups[start : start + _CHECK_CHUNK]
            args: list[Any] = [self._room_ttl_ms, self._key("room", "")]
            for group in chunk:
                args.extend(group)
            results.extend(str(value) for value in await self._check_rooms_script(args=args))
        self._mark_up()
        restarted = 0
        for index, (name, (state, version)) in enumerate(rooms.items()):
            epoch = results[2 * index]
            if self._rooms.get(name) is not state or state.version != version:
                continue
            if state.epoch and epoch != state.epoch:
                self._restart(name, state, epoch)
                restarted += 1
        if restarted:
            logger.warning(
                "%d rooms' streams were lost or rolled back in Redis; their listeners are reset",
                restarted,
            )
        if restarted and poke:
            await self._poke(self._redis)

    async def _poke(self, client: Redis) -> None:
        """Re-arm this node's reader: its blocking read returns at once and starts over."""
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.pexpire(self._wake_key, self._node_ttl_ms)
            await pipe.execute()

    # -- presence

    def _presence_keys(self, room: str, client_id: str) -> list[str]:
        return [
            self._client_key(room, client_id),
            self._room_key(room, "members"),
            self._key("node", self.node_id, "presence"),
        ]

    def _presence_args(self, room: str, client_id: str) -> list[str | int]:
        return [
            self.node_id,
            client_id,
            f"{room} {client_id}",
            self._key("node", ""),
            self._room_ttl_ms,
            self._node_ttl_ms,
        ]

    async def add_presence(self, room: str, client_id: str) -> bool:
        """Count a connection of ``client_id`` on this node; true if no live node had one.

        Cancellation-safe: once the script is sent, it is awaited to its answer even if the
        caller is cancelled (shielded, bounded by the command timeouts), so the local count
        always matches Redis: if this returns, the connection is counted in both; if it
        raises, in neither (or, if the answer was lost, the next heartbeat makes Redis
        match this node again). A caller cancelled meanwhile gets the result and is
        cancelled at its next checkpoint, so it knows to remove the presence it holds.
        """
        client = self._client()
        key = (room, client_id)
        async with self._presence_change():
            # Counted locally first, so that a resync never takes it for a stale entry.
            self._presence[key] += 1
            try:
                with self._commands(f"add presence in {room!r}", write=True):
                    first = await self._shielded(
                        lambda: self._add_presence_script(
                            keys=self._presence_keys(room, client_id),
                            args=self._presence_args(room, client_id),
                            client=client,
                        )
                    )
            except BaseException:
                self._discount(room, client_id)
                # If Redis ran the script but its answer was lost, Redis counts one more
                # than this node: the resync after the outage removes it.
                self._resync_pending = True
                raise
        return bool(first)

    async def remove_presence(self, room: str, client_id: str) -> bool:
        """Count one connection less on this node; true if no live node holds one any more.

        The local count drops even if Redis cannot be reached (the connection is gone); the
        resync after the outage removes what Redis still holds and announces the leave. Like
        :meth:`add_presence`, the script is awaited to its answer even if the caller is
        cancelled, so the counts stay equal.
        """
        client = self._client()
        async with self._presence_change():
            if not self._discount(room, client_id):
                return False
            try:
                with self._commands(f"remove presence in {room!r}", write=True):
                    last = await self._shielded(
                        lambda: self._remove_presence_script(
                            keys=self._presence_keys(room, client_id),
                            args=self._presence_args(room, client_id),
                            client=client,
                        )
                    )
            except BaseException:
                self._resync_pending = True
                raise
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
                keys=[self._room_key(room, "members")],
                args=[self._room_key(room, "client", ""), self._key("node", "")],
                client=client,
            )
        return sorted(str(member) for member in members)

    # -- heartbeat

    async def _heartbeat(self) -> bool:
        """Refresh this node's heartbeat and the TTL of the presence it holds; return whether
        the heartbeat had expired (or Redis was empty). Notes a change of generation."""
        assert self._redis is not None
        hashes = sorted(self._client_key(room, client_id) for room, client_id in self._presence)
        existed, generation = await self._heartbeat_script(
            keys=[
                self._key("node", self.node_id),
                self._key("nodes"),
                self._key("node", self.node_id, "presence"),
                self._wake_key,
                self._key("generation"),
            ],
            args=[
                int(self.presence_ttl * 1000),
                self.node_id,
                self._node_ttl_ms,
                self._room_ttl_ms,
                *hashes,
            ],
        )
        self._mark_writable()
        if generation != self._generation:
            self._generation_unsure = True  # read afresh by _sync_generation
        return not existed

    async def _run_heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            refused: RedisError | None = None
            try:
                try:
                    if await self._heartbeat():
                        self._resync_pending = True
                except _UNREACHABLE:
                    raise
                except RedisError as exc:
                    # Refused (a write under OOM): still keep the rooms alive below (PEXPIRE
                    # is allowed then), so an outage of writes never expires them.
                    refused = exc
                if self._generation_unsure:
                    await self._sync_generation()
                # Keeps the rooms this node uses alive, and resets any whose stream is gone.
                await self._check_rooms(poke=True)
                if refused is not None:
                    self._mark_refused(refused)
                    continue
                if self._resync_pending:
                    await self._resync_presence()
                    self._resync_pending = False
                await self._reap_dead_nodes()
            except _UNREACHABLE as exc:
                self._mark_down(exc)
            except BackendUnavailable:
                pass  # a publish of the resync or reaper: already marked down
            except (BackendError, RedisError) as exc:
                self._mark_refused(exc)

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
        # Entries of this node that Redis holds for clients it holds too may count more
        # connections than this node has (an add whose answer was lost): set above.

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


def _key_part(name: str) -> str:
    """``name`` as written in a key: ``:`` separates a key's parts, so it is ``%3A`` in a name."""
    return name.replace(":", "%3A")


def _entry_seq(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])
