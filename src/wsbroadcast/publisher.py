"""Publishing without sockets: a worker, a cron job or a script that only sends.

A `Publisher` is the write half of a `ConnectionManager`: it opens a
backend, checks and publishes envelopes exactly as ``manager.broadcast`` does, and holds no
connection, queue or room subscription. Through a backend that spans processes (Redis), every
node's clients receive what it publishes, in the room's one order::

    async with Publisher("redis://127.0.0.1:6379/0") as publisher:
        await publisher.publish("orders.eu-1", {"status": "shipped"})

What it publishes comes from the server (``client_id`` null) unless a ``client_id`` is given.
"""

from __future__ import annotations

from types import TracebackType

from pydantic import JsonValue

from ._validation import check_name, check_publication
from .backends.base import Backend, backend_from_url
from .envelope import Draft, Envelope, direct_drafts
from .exceptions import ManagerNotRunning

__all__ = ["Publisher"]


class Publisher:
    """Publishes to rooms through a backend, with no connections: use it as ``async with``.

    :param backend: a URL for `backend_from_url` (the publisher enters and
        exits that backend), or a `Backend` that the caller has
        entered (shared with a manager in the same process, say), which it leaves alone.
    """

    def __init__(self, backend: Backend | str) -> None:
        self._owns_backend = isinstance(backend, str)
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        self._running = False

    async def __aenter__(self) -> Publisher:
        if self._owns_backend:
            await self.backend.__aenter__()
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._running = False
        if self._owns_backend:
            await self.backend.__aexit__(exc_type, exc, tb)

    async def publish(
        self,
        room: str,
        data: JsonValue,
        *,
        client_id: str | None = None,
        type: str = "message",
    ) -> Envelope:
        """Publish ``data`` to ``room``, as the server unless ``client_id`` is given.

        Returns once the backend has ordered and stored the envelope. Raises what
        `ConnectionManager.broadcast` raises: ``InvalidInput`` (nothing published, no
        seq taken) or ``BackendUnavailable``.
        """
        if not self._running:
            raise ManagerNotRunning("use the Publisher inside 'async with publisher:'")
        check_publication(room, client_id, type)
        return await self.backend.publish_draft(Draft(type, room, client_id, data))

    async def send_direct(
        self, to: str, data: JsonValue, *, client_id: str | None = None
    ) -> Envelope:
        """Send a direct message to every connection of ``to`` on any node, as
        `ConnectionManager.send_direct` does (as the server unless ``client_id``)."""
        if not self._running:
            raise ManagerNotRunning("use the Publisher inside 'async with publisher:'")
        drafts = direct_drafts(to, data, client_id)
        envelopes = [await self.backend.publish_draft(draft) for draft in drafts]
        return envelopes[0]

    async def presence(self, room: str) -> list[str]:
        """The client ids connected to ``room`` on any node, sorted."""
        check_name("room", room)
        return await self.backend.presence(room)
