"""An in-memory transport for testing code built on wsbroadcast (like httpx's MockTransport).

>>> transport = MemoryTransport()
>>> connection = await manager.connect(transport, "alice")
>>> await transport.wait_for_frames(1)
>>> transport.messages()[0]["type"]
'join'

It records every frame, can be paused to play a client that stops reading, slowed by a
number of scheduler turns per frame to play a slow one, or told to fail to play a dead one.
Waiting is on events, never on wall-clock time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from .envelope import Envelope
from .transports import _once

__all__ = ["MemoryBatchTransport", "MemoryTransport", "TransportClosed", "forget_logged_once"]


class TransportClosed(ConnectionError):
    """Raised by :class:`MemoryTransport` when sending on a closed or failed socket."""


class MemoryTransport:
    """A fake WebSocket that satisfies :class:`~wsbroadcast.Transport` and records frames.

    :param turns_per_send: scheduler turns each send takes (one checkpoint each): a
        deterministic stand-in for a slow network.
    :param fail_after: raise :class:`TransportClosed` on this send (0 = the first), playing a
        client that vanished.
    """

    def __init__(self, *, turns_per_send: int = 0, fail_after: int | None = None) -> None:
        self.turns_per_send = turns_per_send
        self.fail_after = fail_after
        self.frames: list[str] = []
        self.accepted = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._resume: anyio.Event | None = None
        self._changed = anyio.Event()
        self._closed = anyio.Event()

    async def accept(self) -> None:
        """Record the handshake."""
        self.accepted = True

    async def send_text(self, data: str, /) -> None:
        """Record one frame, after any pause or slowness; raise if closed or failing."""
        if not isinstance(data, str):
            raise TypeError(f"send_text takes str, not {type(data).__name__}")
        while self._resume is not None:
            await self._resume.wait()
        for _ in range(self.turns_per_send):
            await anyio.lowlevel.checkpoint()
        if self._closed.is_set():
            raise TransportClosed("send on a closed transport")
        if self.fail_after is not None and len(self.frames) >= self.fail_after:
            raise TransportClosed("the peer is gone")
        self.frames.append(data)
        self._notify()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Record the close code and reason; later sends raise."""
        if not self._closed.is_set():
            self.close_code = code
            self.close_reason = reason
            self._closed.set()
            self._notify()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def pause(self) -> None:
        """Make sends block until :meth:`resume`: a client that stopped reading."""
        if self._resume is None:
            self._resume = anyio.Event()

    def resume(self) -> None:
        """Let blocked sends go on."""
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    def messages(self) -> list[Any]:
        """Every frame received so far, parsed from JSON."""
        return [json.loads(frame) for frame in self.frames]

    def envelopes(self) -> list[Any]:
        """The received frames that are sequenced envelopes (they have a ``seq``)."""
        return [message for message in self.messages() if "seq" in message]

    async def wait_until(self, predicate: Callable[[MemoryTransport], bool]) -> None:
        """Wait until ``predicate(self)`` is true, re-checking after every frame or close."""
        while not predicate(self):
            self._changed = changed = anyio.Event()
            await changed.wait()

    async def wait_for_frames(self, count: int) -> None:
        """Wait until at least ``count`` frames have arrived."""
        await self.wait_until(lambda transport: len(transport.frames) >= count)

    async def wait_closed(self) -> None:
        """Wait until the manager closed this transport."""
        await self._closed.wait()

    def _notify(self) -> None:
        self._changed.set()


class MemoryBatchTransport(MemoryTransport):
    """A :class:`MemoryTransport` that also plays the fast path (``NowaitBatchTransport``).

    ``send_batch_nowait`` writes at once unless the transport is paused or slow
    (``turns_per_send > 0``), in which case it refuses, as a full socket would, and the
    manager falls back to ``send_batch``.
    """

    async def send_batch(self, frames: Sequence[Envelope | str], /) -> None:
        """Send each frame in order, with the pauses and slowness of ``send_text``."""
        for item in frames:
            await self.send_text(item if isinstance(item, str) else item.text)

    def send_batch_nowait(self, frames: Sequence[Envelope | str], /) -> bool:
        """Record every frame now and return true, or return false if paused or slow."""
        if self._resume is not None or self.turns_per_send:
            return False
        for item in frames:
            if self._closed.is_set():
                raise TransportClosed("send on a closed transport")
            if self.fail_after is not None and len(self.frames) >= self.fail_after:
                raise TransportClosed("the peer is gone")
            self.frames.append(item if isinstance(item, str) else item.text)
        self._notify()
        return True


def forget_logged_once() -> None:
    """Make the transports log their configuration notes again, as in a fresh process.

    Why a connection cannot take the fast path (no ``wsbroadcast.frames`` extension,
    permessage-deflate negotiated) is logged once per process, not once per connection. A
    test of that logging calls this first, so that connections of earlier tests in the same
    process do not hide it.
    """
    _once.forget()
