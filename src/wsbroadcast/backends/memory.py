"""The in-process backend: one event loop, no broker, ordered by construction."""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from itertools import islice
from urllib.parse import parse_qs, urlsplit

from ..envelope import Draft, Envelope, Stored, new_epoch, restored, stored
from ..exceptions import InvalidBackendOptions, InvalidBackendURL
from .base import Backend, History, Listener, ResetListener, Subscription

__all__ = ["DEFAULT_HISTORY", "DEFAULT_HISTORY_BYTES", "DEFAULT_HISTORY_TTL", "MemoryBackend"]

logger = logging.getLogger("wsbroadcast.backends.memory")

DEFAULT_HISTORY = 1000
"""Envelopes kept per room, at most."""
DEFAULT_HISTORY_BYTES = 4 * 1024 * 1024
"""Bytes of envelopes (their wire form) kept per room, at most."""
DEFAULT_HISTORY_TTL = 600.0
"""Seconds a room with nobody in it is remembered after its last publish."""


class _Stream:
    """One room's stream: its epoch, counter, bounded history, listeners and presence."""

    __slots__ = ("epoch", "history", "history_bytes", "listeners", "members", "seq")

    def __init__(self) -> None:
        self.epoch = new_epoch()
        self.seq = 0
        # Made at the first publish: most streams of a chat (a personal stream per user)
        # are quiet, and an empty deque costs several hundred bytes. Stored, not Envelope:
        # the garbage collector does not track what it holds.
        self.history: deque[Stored] | None = None
        self.history_bytes = 0
        self.listeners: list[Listener] = []
        self.members: Counter[str] = Counter()

    @property
    def idle(self) -> bool:
        """Nobody listens and nobody is present: the room may be forgotten after its TTL."""
        return not self.listeners and not self.members


class _MemorySubscription:
    def __init__(self, backend: MemoryBackend, room: str, listener: Listener) -> None:
        self._backend = backend
        self._room = room
        self._listener: Listener | None = listener

    async def aclose(self) -> None:
        if self._listener is not None:
            self._backend._unsubscribe(self._room, self._listener)
            self._listener = None


class MemoryBackend(Backend):
    """Keeps every room in this process: for one server process, and for tests.

    ``publish_draft`` does not yield to the event loop between taking a seq and calling the
    listeners, so envelopes reach every listener in ``seq`` order with no lock. Each room
    keeps its last envelopes, at most ``history_size`` of them and ``history_bytes`` of wire
    form (0 keeps none, so any resume that missed something reports an incomplete history).
    A room with no listener and no presence is forgotten ``history_ttl`` seconds after its
    last publish (None: never), so rooms that nobody uses cost nothing; a later publish
    starts a new stream, with a new epoch. Every room's epoch is new when the process starts.

    :param clock: a monotonic clock in seconds (injectable for tests).
    """

    def __init__(
        self,
        history_size: int = DEFAULT_HISTORY,
        *,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        history_ttl: float | None = DEFAULT_HISTORY_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if history_size < 0:
            raise InvalidBackendOptions(f"history size must be >= 0, not {history_size}")
        if history_bytes < 0:
            raise InvalidBackendOptions(f"history_bytes must be >= 0, not {history_bytes}")
        if history_ttl is not None and not history_ttl > 0:
            raise InvalidBackendOptions(f"history_ttl must be positive, not {history_ttl}")
        self.history_size = history_size
        self.history_bytes = history_bytes
        self.history_ttl = history_ttl
        self._clock = clock
        self._rooms: dict[str, _Stream] = {}
        self._idle: OrderedDict[str, float] = OrderedDict()
        """Idle rooms -> when they are forgotten, soonest first."""

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Build from ``memory://?history=N&history_bytes=B&history_ttl=S`` (all optional;
        ``history_ttl=none`` never forgets)."""
        query = parse_qs(urlsplit(url).query)
        unknown = set(query) - {"history", "history_bytes", "history_ttl"}
        if unknown:
            raise InvalidBackendURL(f"memory:// does not take {sorted(unknown)}")
        try:
            history = int(query.get("history", [str(DEFAULT_HISTORY)])[-1])
            history_bytes = int(query.get("history_bytes", [str(DEFAULT_HISTORY_BYTES)])[-1])
            ttl_text = query.get("history_ttl", [str(DEFAULT_HISTORY_TTL)])[-1]
            ttl = None if ttl_text.lower() == "none" else float(ttl_text)
        except ValueError:
            raise InvalidBackendURL(f"bad number in {url!r}") from None
        return cls(history, history_bytes=history_bytes, history_ttl=ttl)

    def statistics(self) -> dict[str, int]:
        """Rooms held now, and how many of them nobody uses (forgotten after the TTL)."""
        self._forget_expired()
        return {"rooms": len(self._rooms), "idle_rooms": len(self._idle)}

    # -- room lifetime

    def _stream(self, room: str) -> _Stream:
        self._forget_expired()
        stream = self._rooms.get(room)
        if stream is None:
            stream = self._rooms[room] = _Stream()
        return stream

    def _forget_expired(self) -> None:
        idle = self._idle
        if not idle:
            return
        now = self._clock()
        forgotten = 0
        while idle:
            room, deadline = next(iter(idle.items()))
            if deadline > now:
                break
            del idle[room]
            del self._rooms[room]
            forgotten += 1
        if forgotten > 1000 and forgotten > len(self._rooms):
            # A dict never shrinks by deletion: copy it, so memory goes back after a surge.
            self._rooms = dict(self._rooms)
            self._idle = OrderedDict(idle)

    def _touch(self, room: str, stream: _Stream) -> None:
        """Keep the room while it is used; start (or restart) its TTL when it is idle."""
        if not stream.idle:
            self._idle.pop(room, None)
        elif self.history_ttl is not None:
            self._idle[room] = self._clock() + self.history_ttl
            self._idle.move_to_end(room)

    # -- the Backend interface

    async def publish_draft(self, draft: Draft) -> Envelope:
        room = draft.room
        stream = self._stream(room)
        stream.seq += 1
        envelope = draft.envelope(stream.seq, stream.epoch)
        if self.history_size and draft.size <= self.history_bytes:
            history = stream.history
            if history is None:
                history = stream.history = deque()
            history.append(stored(envelope))
            stream.history_bytes += envelope.size
            while len(history) > self.history_size or stream.history_bytes > self.history_bytes:
                stream.history_bytes -= history.popleft()[1]
        else:
            stream.history = None
            stream.history_bytes = 0
        self._touch(room, stream)
        for listener in tuple(stream.listeners):
            try:
                listener(envelope)
            except Exception:
                logger.exception("listener for room %r failed; it is skipped", room)
        return envelope

    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        self._forget_expired()
        stream = self._rooms.get(room)
        if stream is None:
            return History(room, since, complete=since == 0, last_seq=0, first_seq=1)
        history = stream.history
        first = history[0][0] if history else stream.seq + 1
        complete = first - 1 <= since <= stream.seq and (
            since == 0 or epoch is None or epoch == stream.epoch
        )
        envelopes: tuple[Envelope, ...] = ()
        if complete and since < stream.seq:
            skip = since - first + 1
            envelopes = tuple(map(restored, islice(history or (), skip, None)))
        return History(room, since, complete, stream.seq, first, envelopes, stream.epoch)

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        # A stream held in this process is never lost while someone listens: no resets.
        stream = self._stream(room)
        stream.listeners.append(listener)
        self._touch(room, stream)
        return _MemorySubscription(self, room, listener)

    def _unsubscribe(self, room: str, listener: Listener) -> None:
        stream = self._rooms.get(room)
        if stream is not None and listener in stream.listeners:
            stream.listeners.remove(listener)
            self._touch(room, stream)

    async def add_presence(self, room: str, client_id: str) -> bool:
        stream = self._stream(room)
        stream.members[client_id] += 1
        self._touch(room, stream)
        return stream.members[client_id] == 1

    async def remove_presence(self, room: str, client_id: str) -> bool:
        stream = self._rooms.get(room)
        if stream is None or stream.members[client_id] <= 0:
            return False
        stream.members[client_id] -= 1
        if stream.members[client_id]:
            return False
        del stream.members[client_id]
        self._touch(room, stream)
        return True

    async def presence(self, room: str) -> list[str]:
        stream = self._rooms.get(room)
        return sorted(stream.members) if stream is not None else []
