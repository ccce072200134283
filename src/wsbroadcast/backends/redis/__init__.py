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

On a Redis Cluster (`RedisClusterBackend`, ``redis+cluster://``) every key is
``P{<tag>}:`` followed by the same parts, the tag naming the room's *partition* (see
`KeyLayout`), so that each script touches one slot.

One reader task per backend (per partition on a cluster) does a single blocking ``XREAD``
over the logs of the rooms with local listeners (and its wake stream), and calls the
listeners in seq order, or tells them a `StreamReset` first when
it cannot. See ``docs/backends.md`` for
the guarantees, their costs and the behaviour on each fault.

The code is split by concern: ``scripts`` (the Lua scripts), ``keys`` (the key layout),
``link`` (health, backoff, errors, Redis's generation), ``reader`` (subscriptions and the
stream reader), ``presence`` (presence, heartbeat, reaper, resync), ``backend`` (the
class, publish, history, rate limits) and ``cluster`` (the Redis Cluster backend).
"""

from __future__ import annotations

from .backend import RedisBackend
from .cluster import DEFAULT_PARTITIONS, RedisClusterBackend, RedisClusterHealth
from .keys import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES, DEFAULT_HISTORY_TTL, DEFAULT_PREFIX
from .link import RedisHealth

__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_HISTORY_BYTES",
    "DEFAULT_HISTORY_TTL",
    "DEFAULT_PARTITIONS",
    "DEFAULT_PREFIX",
    "RedisBackend",
    "RedisClusterBackend",
    "RedisClusterHealth",
    "RedisHealth",
]
