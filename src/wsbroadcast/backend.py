"""The backend interface: where a room's messages are ordered, stored and fanned out.

A backend is the single source of order. ``publish`` assigns each room's next ``seq`` and
the timestamp, keeps the envelope in a bounded history, and hands it to every listener
subscribed to the room, on every node, in ``seq`` order. Backends are chosen by URL
(``memory://``, ``redis://host:port/db``) with :func:`backend_from_url`, which imports the
backend's module only when its scheme is used, so the core never imports a broker client.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from pydantic import JsonValue

from .envelope import Envelope
from .exceptions import InvalidBackendURL

__all__ = ["Backend", "History", "Listener", "Subscription", "backend_from_url"]

Listener = Callable[[Envelope], None]
"""Called once per envelope of a subscribed room, in ``seq`` order. It must not block."""


@dataclass(frozen=True)
class History:
    """The answer to ``Backend.history(room, since)``.

    ``complete`` is the all-or-nothing recovery flag: when true, ``envelopes`` are exactly the
    envelopes with ``seq > since``, in order, with no gap. When false, history does not reach
    back that far (it was trimmed, or the backend lost it, or ``since`` is ahead of the
    room), and ``envelopes`` is empty: the client must treat its state as stale.
    """

    room: str
    since: int
    complete: bool
    last_seq: int
    """The room's newest ``seq`` when history was read (0 for a room never published to)."""
    first_seq: int
    """The oldest ``seq`` still held (``last_seq + 1`` when nothing is held)."""
    envelopes: Sequence[Envelope] = ()


class Subscription(Protocol):
    """A handle on a listener registered with :meth:`Backend.subscribe`."""

    async def aclose(self) -> None:
        """Stop calling the listener. Idempotent."""
        ...


class Backend(abc.ABC):
    """Orders, stores and fans out the envelopes of every room.

    Implementations promise, per room: ``seq`` starts at 1 and grows by exactly 1 per
    published envelope; each listener receives every envelope published after its
    ``subscribe`` returned, exactly once and in ``seq`` order; ``history`` is all or nothing.

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

    @abc.abstractmethod
    async def publish(
        self, room: str, type: str, client_id: str, data: JsonValue = None
    ) -> Envelope:
        """Assign the room's next seq and a timestamp, store, fan out, and return the envelope.

        Inputs have been validated by the caller. Raises
        :class:`~wsbroadcast.exceptions.BackendUnavailable` if the envelope could not be
        published; in that case no seq was consumed.
        """

    @abc.abstractmethod
    async def history(self, room: str, since: int) -> History:
        """Return the envelopes of ``room`` with ``seq > since``, or say history is incomplete."""

    @abc.abstractmethod
    async def subscribe(self, room: str, listener: Listener) -> Subscription:
        """Call ``listener`` with every envelope published to ``room`` from now on."""

    @abc.abstractmethod
    async def add_presence(self, room: str, client_id: str) -> bool:
        """Count one more connection of ``client_id`` in ``room``; true if it is the first."""

    @abc.abstractmethod
    async def remove_presence(self, room: str, client_id: str) -> bool:
        """Count one connection of ``client_id`` less in ``room``; true if it was the last."""

    @abc.abstractmethod
    async def presence(self, room: str) -> list[str]:
        """The client ids with at least one connection in ``room``, sorted."""

    def health(self) -> dict[str, JsonValue]:
        """A JSON-able status for health checks and metrics; ``status`` is ``"ok"`` or not."""
        return {"status": "ok", "backend": type(self).__name__}


# scheme -> (module, class, the extra that installs what the module imports)
_SCHEMES: dict[str, tuple[str, str, str]] = {
    "memory": ("wsbroadcast.backends.memory", "MemoryBackend", ""),
    "redis": ("wsbroadcast.backends.redis", "RedisBackend", "redis"),
    "rediss": ("wsbroadcast.backends.redis", "RedisBackend", "redis"),
}


def backend_from_url(url: str) -> Backend:
    """Build the backend a URL names, importing its module (and broker client) only now.

    ``memory://`` (options: ``?history=1000``) is in-process; ``redis://host:port/db`` and
    ``rediss://`` need the ``wsbroadcast[redis]`` extra.
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
