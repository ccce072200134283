"""The in-process backend: one event loop, no broker, ordered by construction."""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

from pydantic import JsonValue

from ..backend import Backend, History, Listener, Subscription
from ..envelope import Envelope
from ..exceptions import InvalidBackendURL

__all__ = ["MemoryBackend"]

logger = logging.getLogger("wsbroadcast.backends.memory")

DEFAULT_HISTORY = 1000


class _Room:
    __slots__ = ("history", "listeners", "members", "seq")

    def __init__(self, history_size: int) -> None:
        self.seq = 0
        self.history: deque[Envelope] = deque(maxlen=history_size)
        self.listeners: list[Listener] = []
        self.members: Counter[str] = Counter()


class _MemorySubscription:
    def __init__(self, room: _Room, listener: Listener) -> None:
        self._room = room
        self._listener: Listener | None = listener

    async def aclose(self) -> None:
        if self._listener is not None:
            self._room.listeners.remove(self._listener)
            self._listener = None


class MemoryBackend(Backend):
    """Keeps every room in this process: for one server process, and for tests.

    ``publish`` does not yield to the event loop between taking a seq and calling the
    listeners, so envelopes reach every listener in ``seq`` order with no lock. Each room keeps
    its last ``history_size`` envelopes in a ring buffer (default 1,000; 0 keeps none, so any
    resume that missed something reports an incomplete history).
    """

    def __init__(self, history_size: int = DEFAULT_HISTORY) -> None:
        if history_size < 0:
            raise InvalidBackendURL(f"history size must be >= 0, not {history_size}")
        self.history_size = history_size
        self._rooms: dict[str, _Room] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Build from ``memory://`` with an optional ``?history=N``."""
        query = parse_qs(urlsplit(url).query)
        unknown = set(query) - {"history"}
        if unknown:
            raise InvalidBackendURL(f"memory:// does not take {sorted(unknown)}")
        try:
            history = int(query.get("history", [str(DEFAULT_HISTORY)])[-1])
        except ValueError:
            raise InvalidBackendURL(f"history must be an integer in {url!r}") from None
        return cls(history_size=history)

    def _room(self, room: str) -> _Room:
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room(self.history_size)
        return state

    async def publish(
        self, room: str, type: str, client_id: str, data: JsonValue = None
    ) -> Envelope:
        state = self._room(room)
        state.seq += 1
        envelope = Envelope.model_construct(
            type=type,
            room=room,
            seq=state.seq,
            id=uuid.uuid4().hex,
            client_id=client_id,
            timestamp=datetime.now(timezone.utc),
            data=data,
        )
        state.history.append(envelope)
        for listener in tuple(state.listeners):
            try:
                listener(envelope)
            except Exception:
                logger.exception("listener for room %r failed; it is skipped", room)
        return envelope

    async def history(self, room: str, since: int) -> History:
        state = self._rooms.get(room)
        if state is None:
            return History(room, since, complete=since == 0, last_seq=0, first_seq=1)
        first = state.history[0].seq if state.history else state.seq + 1
        complete = first - 1 <= since <= state.seq
        envelopes: tuple[Envelope, ...] = ()
        if complete and since < state.seq:
            skip = since - first + 1
            envelopes = tuple(state.history)[skip:]
        return History(room, since, complete, state.seq, first, envelopes)

    async def subscribe(self, room: str, listener: Listener) -> Subscription:
        state = self._room(room)
        state.listeners.append(listener)
        return _MemorySubscription(state, listener)

    async def add_presence(self, room: str, client_id: str) -> bool:
        members = self._room(room).members
        members[client_id] += 1
        return members[client_id] == 1

    async def remove_presence(self, room: str, client_id: str) -> bool:
        members = self._room(room).members
        if members[client_id] <= 0:
            return False
        members[client_id] -= 1
        if members[client_id] == 0:
            del members[client_id]
            return True
        return False

    async def presence(self, room: str) -> list[str]:
        state = self._rooms.get(room)
        return sorted(state.members) if state is not None else []
