"""An in-memory transport for testing code built on wsbroadcast (like httpx's MockTransport).

>>> transport = MemoryTransport()
>>> connection = await manager.connect(transport, "alice")
>>> await transport.wait_for_messages(1)
>>> transport.messages()[0]["type"]
'join'

It records the text of every message sent to it, can be paused to play a client that stops
reading, slowed by a number of scheduler turns per message to play a slow one, or told to
fail to play a dead one.
Waiting is on events, never on wall-clock time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from ._deprecated import warn_renamed
from .outbound import OutboundMessage
from .transports import _once

__all__ = ["MemoryBatchTransport", "MemoryTransport", "TransportClosed", "forget_logged_once"]


class TransportClosed(ConnectionError):
    """Raised by `MemoryTransport` when sending on a closed or failed socket."""


class MemoryTransport:
    """A fake WebSocket that satisfies `Transport` and records what is sent to it in `texts`.

    :param turns_per_send: scheduler turns each send takes (one checkpoint each): a
        deterministic stand-in for a slow network.
    :param fail_after: raise `TransportClosed` on this send (0 = the first), playing a
        client that vanished.
    """

    def __init__(self, *, turns_per_send: int = 0, fail_after: int | None = None) -> None:
        self.turns_per_send = turns_per_send
        self.fail_after = fail_after
        self.texts: list[str] = []
        """The text of every message sent, in order (each one text frame on a real socket)."""
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
        """Record one message, after any pause or slowness; raise if closed or failing."""
        if not isinstance(data, str):
            raise TypeError(f"send_text takes str, not {type(data).__name__}")
        while self._resume is not None:
            await self._resume.wait()
        for _ in range(self.turns_per_send):
            await anyio.lowlevel.checkpoint()
        if self._closed.is_set():
            raise TransportClosed("send on a closed transport")
        if self.fail_after is not None and len(self.texts) >= self.fail_after:
            raise TransportClosed("the peer is gone")
        self.texts.append(data)
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
        """Whether `close` was called."""
        return self._closed.is_set()

    def pause(self) -> None:
        """Make sends block until `resume`: a client that stopped reading."""
        if self._resume is None:
            self._resume = anyio.Event()

    def resume(self) -> None:
        """Let blocked sends go on."""
        if self._resume is not None:
            self._resume.set()
            self._resume = None

    @property
    def frames(self) -> list[str]:
        """Deprecated: use `texts` (the same list)."""
        warn_renamed("MemoryTransport.frames", "MemoryTransport.texts")
        return self.texts

    def messages(self) -> list[Any]:
        """Every message received so far, parsed from JSON."""
        return [json.loads(text) for text in self.texts]

    def envelopes(self) -> list[Any]:
        """The received messages that are sequenced envelopes (they have a `seq`)."""
        return [message for message in self.messages() if "seq" in message]

    async def wait_until(self, predicate: Callable[[MemoryTransport], bool]) -> None:
        """Wait until `predicate(self)` is true, re-checking after every message or close."""
        while not predicate(self):
            self._changed = changed = anyio.Event()
            await changed.wait()

    async def wait_for_messages(self, count: int) -> None:
        """Wait until at least `count` messages have arrived."""
        await self.wait_until(lambda transport: len(transport.texts) >= count)

    async def wait_for_frames(self, count: int) -> None:
        """Deprecated: use `wait_for_messages`."""
        warn_renamed("MemoryTransport.wait_for_frames()", "MemoryTransport.wait_for_messages()")
        await self.wait_for_messages(count)

    async def wait_closed(self) -> None:
        """Wait until the manager closed this transport."""
        await self._closed.wait()

    def _notify(self) -> None:
        self._changed.set()


class MemoryBatchTransport(MemoryTransport):
    """A `MemoryTransport` that also plays the fast path (``NowaitBatchTransport``).

    ``send_batch_nowait`` writes at once unless the transport is paused or slow
    (``turns_per_send > 0``), in which case it refuses, as a full socket would, and the
    manager falls back to ``send_batch``.
    """

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        """Send each message in order, with the pauses and slowness of `send_text`."""
        for message in messages:
            await self.send_text(message.text)

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        """Record every message now and return true, or return false if paused or slow."""
        if self._resume is not None or self.turns_per_send:
            return False
        texts = self.texts
        for message in messages:
            if self._closed.is_set():
                raise TransportClosed("send on a closed transport")
            if self.fail_after is not None and len(texts) >= self.fail_after:
                raise TransportClosed("the peer is gone")
            texts.append(message.text)
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
