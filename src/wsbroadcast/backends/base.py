"""The backend interface: where a room's messages are ordered, stored and fanned out.

A backend is the single source of order. ``publish_draft`` assigns each room's next ``seq``
in the room's stream (named by its ``epoch``), keeps the envelope in a history bounded in
count, bytes and time, and hands it to every listener subscribed to the room, on every node,
in ``seq`` order. Backends are chosen by URL
(``memory://``, ``redis://host:port/db``) with `backend_from_url`, which imports the
backend's module only when its scheme is used, so the core never imports a broker client.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from pydantic import JsonValue

from .._deprecated import warn_renamed
from ..envelope import Draft, Envelope
from ..exceptions import InvalidBackendURL, InvalidInput

__all__ = [
    "Backend",
    "BackendHealth",
    "History",
    "Listener",
    "ResetListener",
    "StreamReset",
    "Subscription",
    "backend_from_url",
]

Listener = Callable[[Envelope], None]
"""Called once per envelope of a subscribed room, in ``seq`` order. It must not block."""


@dataclass(frozen=True)
class StreamReset:
    """Told to a room's listeners when envelopes they were owed can no longer be delivered.

    The stream was lost and restarted under a new ``epoch`` (a Redis that came back empty),
    or this node fell so far behind that history was trimmed before it read it. The next
    envelope a listener receives has ``seq > after_seq`` in stream ``epoch``; what it missed
    is gone. The manager turns this into a ``history_lost`` frame to every member before any
    envelope of the new stream, so no client ever sees a silent jump.
    """

    room: str
    epoch: str
    after_seq: int
    """Envelopes of ``epoch`` up to this seq will not be delivered (0 for a new stream)."""


ResetListener = Callable[[StreamReset], None]
"""Called when a subscribed room's stream was reset or has a gap; must not block."""


@dataclass(frozen=True)
class History:
    """The answer to ``Backend.history(room, since)``.

    ``complete`` is the all-or-nothing recovery flag: when true, ``envelopes`` are exactly the
    envelopes with ``seq > since`` of the stream ``epoch``, in order, with no gap. When false,
    history does not reach back that far (it was trimmed, or the backend lost it, or the
    caller's epoch is not the stream's, or ``since`` is ahead of the room), and ``envelopes``
    is empty: the client must treat its state as stale.
    """

    room: str
    since: int
    complete: bool
    last_seq: int
    """The room's newest ``seq`` when history was read (0 for a room never published to)."""
    first_seq: int
    """The oldest ``seq`` still held (``last_seq + 1`` when nothing is held)."""
    envelopes: Sequence[Envelope] = ()
    epoch: str = ""
    """The stream's epoch ("" for a room that has no stream: never published to, or forgotten)."""


@dataclass(frozen=True)
class BackendHealth:
    """What `Backend.health` reports, for health checks and metrics.

    Backends add their own fields in a subclass (see `RedisHealth`); `as_dict` gives them all
    as JSON-able values, for a `/healthz` body.
    """

    status: str
    """`"ok"`, or `"degraded"` while the backend cannot do its work (a broker unreachable)."""
    backend: str
    """The backend's class name."""

    @property
    def ok(self) -> bool:
        """Whether `status` is `"ok"`."""
        return self.status == "ok"

    def as_dict(self) -> dict[str, JsonValue]:
        """Every field, by name: JSON-able."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        """Deprecated: `health()` was a dict; read the attribute instead."""
        warn_renamed(f"health()[{key!r}]", f"health().{key}")
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: `health()` was a dict; read the attribute instead."""
        warn_renamed(f"health().get({key!r})", f"health().{key}")
        return getattr(self, key, default)


class Subscription(Protocol):
    """A handle on a listener registered with `Backend.subscribe`."""

    async def aclose(self) -> None:
        """Stop calling the listener. Idempotent."""
        ...


class Backend(abc.ABC):
    """Orders, stores and fans out the envelopes of every room.

    Implementations promise, per room: ``seq`` starts at 1 in each epoch and grows by exactly
    1 per published envelope; each listener receives every envelope published after its
    ``subscribe`` returned, exactly once and in ``seq`` order, or is told a
    `StreamReset` first; ``history`` is all or nothing; a draft that cannot be stored
    consumes no seq. A room with no presence and no listener is forgotten (history, epoch
    and all) once nothing was published to it for ``history_ttl`` seconds.

    A backend is an async context manager: the manager enters it on its own ``async with``,
    and the backend may run background tasks (such as a broker reader) until it exits.
    """

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def publish(
        self, room: str, type: str, client_id: str | None, data: JsonValue = None
    ) -> Envelope:
        """Encode an envelope (`Draft`) and `publish_draft` it.

        Raises `InvalidData` before anything is published if
        ``data`` cannot be encoded. Names are not checked here: the manager checks them.
        """
        return await self.publish_draft(Draft(type, room, client_id, data))

    @abc.abstractmethod
    async def publish_draft(self, draft: Draft) -> Envelope:
        """Assign the room's next seq (in its current epoch), store, fan out, return it.

        The draft is already encoded, so nothing after the seq is taken can fail for the
        data's sake. Raises `BackendUnavailable` if the
        envelope could not be published; in that case no seq was consumed.
        """

    @abc.abstractmethod
    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        """Return the envelopes of ``room`` with ``seq > since``, or say history is incomplete.

        With ``epoch`` (the epoch of the client's last envelope), history is incomplete unless
        it is the stream's current epoch. Without it, a client that missed a restart of the
        stream whose ``since`` is not ahead of the new stream cannot be told apart.
        """

    async def position(self, room: str) -> tuple[str, int]:
        """The stream's epoch and last seq now (``("", 0)`` for a room with no stream).

        What a client joining without ``since`` is up to date with. The default asks
        `history` for a position far ahead of any room, which both backends answer
        without reading entries.
        """
        history = await self.history(room, _FAR_AHEAD)
        return history.epoch, history.last_seq

    @abc.abstractmethod
    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        """Call ``listener`` with every envelope published to ``room`` from now on.

        ``on_reset`` is told, before any envelope that follows it, when the listener will
        not get envelopes it was owed (see `StreamReset`).
        """

    @abc.abstractmethod
    async def add_presence(self, room: str, client_id: str) -> bool:
        """Count one more connection of ``client_id`` in ``room``; true if it is the first."""

    @abc.abstractmethod
    async def remove_presence(self, room: str, client_id: str) -> bool:
        """Count one connection of ``client_id`` less in ``room``; true if it was the last."""

    @abc.abstractmethod
    async def presence(self, room: str) -> list[str]:
        """The client ids with at least one connection in ``room``, sorted."""

    def health(self) -> BackendHealth:
        """The backend's status for health checks and metrics (`status` is `"ok"` or not)."""
        return BackendHealth(status="ok", backend=type(self).__name__)

    async def allow(self, key: str, rate: float, burst: float) -> bool:
        """Take one token from the bucket ``key`` (refilled at ``rate`` per second, up to
        ``burst``); false if it is empty. Backends that span nodes share the bucket between
        them (the Redis backend does), so a limit holds across every node.

        This default keeps the buckets in this process, at most `max_buckets` of them:
        past that, the least recently used is forgotten (and starts full if used again).
        """
        if not (rate > 0 and burst >= 1 and math.isfinite(rate) and math.isfinite(burst)):
            raise InvalidInput(f"need rate > 0 and burst >= 1, not {rate} and {burst}")
        buckets = self._buckets
        now = time.monotonic()
        tokens, last = buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        buckets[key] = (tokens, now)
        while len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
        return allowed

    max_buckets = 100_000
    """Most rate-limit buckets `allow` keeps in this process."""

    @functools.cached_property
    def _buckets(self) -> OrderedDict[str, tuple[float, float]]:
        """Rate-limit buckets of `allow`: key -> (tokens, when last refilled)."""
        return OrderedDict()


# scheme -> (module, class, the extra that installs what the module imports)
_SCHEMES: dict[str, tuple[str, str, str]] = {
    "memory": ("wsbroadcast.backends.memory", "MemoryBackend", ""),
    "redis": ("wsbroadcast.backends.redis", "RedisBackend", "redis"),
    "rediss": ("wsbroadcast.backends.redis", "RedisBackend", "redis"),
    "redis+cluster": ("wsbroadcast.backends.redis", "RedisClusterBackend", "redis"),
    "rediss+cluster": ("wsbroadcast.backends.redis", "RedisClusterBackend", "redis"),
}


_FAR_AHEAD = 2**63 - 1
"""A ``since`` no room reaches: history answers it with the room's position and no entries."""


def backend_from_url(url: str) -> Backend:
    """Build the backend a URL names, importing its module (and broker client) only now.

    ``memory://`` (options: ``?history=1000``) is in-process; ``redis://host:port/db``,
    ``rediss://``, ``redis+cluster://host:port,host:port/`` (a Redis Cluster) and
    ``rediss+cluster://`` need the ``wsbroadcast[redis]`` extra.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        known = ", ".join(f"{name}://" for name in _SCHEMES)
        raise InvalidBackendURL(f"unknown backend URL {url!r}: expected one of {known}")
    module_name, class_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidBackendURL(
            f"backend {scheme}:// needs an extra: pip install 'wsbroadcast[{extra}]' ({exc})"
        ) from exc
    backend_class = getattr(module, class_name)
    backend: Backend = backend_class.from_url(url)
    return backend
