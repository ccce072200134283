"""Fault injection for the attack tests: transports and backends that misbehave on purpose.

* :class:`HangingTransport` / :class:`HangingBatchTransport`: a send that ignores
  cancellation and never returns until the test releases it (hypercorn's trio worker does
  this when its peer stops reading).
* :class:`GatedAcceptBatchTransport`: a fast-path transport whose ``accept()`` finishes
  only when the test says so (to finish a handshake after the manager began exiting).
* :class:`CheckpointCancel` with :class:`CheckpointBackend`, :class:`CheckpointTransport`
  and :class:`CheckpointBatchTransport`: every await of the backend and of the transport,
  before and after delegating, is a numbered checkpoint; the k-th one cancels a given
  cancel scope. Also used without cancelling, with several checkpoints per call, so that
  other tasks interleave at every await.
* :class:`GatedSubscribeBackend`: ``subscribe`` waits for the test when asked to, so that
  a second connect can arrive while the first is making the room's subscription.

Only the library's public API is used; nothing here waits on wall-clock time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from wsbroadcast import Connection, ConnectionManager, OutboundMessage
from wsbroadcast.backends.base import History, Listener, ResetListener, Subscription
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.envelope import Draft, Envelope
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

__all__ = [
    "CheckpointBackend",
    "CheckpointBatchTransport",
    "CheckpointCancel",
    "CheckpointTransport",
    "GatedAcceptBatchTransport",
    "GatedSubscribeBackend",
    "HangingBatchTransport",
    "HangingTransport",
    "stall_one_of_two",
]


# -- sends that never return


class _Hanging:
    """Sends that hang, shielded from cancellation, until :meth:`release`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stuck = anyio.Event()
        """Set once a send is hanging."""
        self._released = anyio.Event()

    def release(self) -> None:
        """Let every hanging send (and every later one) go on."""
        self._released.set()

    async def _hang(self) -> None:
        with anyio.CancelScope(shield=True):
            self.stuck.set()
            await self._released.wait()


class HangingTransport(_Hanging, MemoryTransport):
    """A :class:`MemoryTransport` whose ``send_text`` hangs, shielded, until :meth:`release`.

    Cancelling the task that sends has no effect: the send returns only once the test
    calls :meth:`release` (then it behaves as a ``MemoryTransport`` send: it records the
    frame, or raises if the transport was closed meanwhile). ``close`` never hangs.
    """

    async def send_text(self, data: str, /) -> None:
        await self._hang()
        await super().send_text(data)


class HangingBatchTransport(_Hanging, MemoryBatchTransport):
    """The fast-path version: ``send_batch_nowait`` refuses (a full socket) until released,
    and ``send_text``/``send_batch`` hang, shielded, until :meth:`release`."""

    async def send_text(self, data: str, /) -> None:
        await self._hang()
        await super().send_text(data)

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        await self._hang()
        await super().send_batch(messages)

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        if not self._released.is_set():
            return False
        return super().send_batch_nowait(messages)


class GatedAcceptBatchTransport(MemoryBatchTransport):
    """A fast-path transport whose ``accept()`` waits until :meth:`finish_accept`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.accepting = anyio.Event()
        """Set once ``accept()`` was called."""
        self._gate = anyio.Event()

    def finish_accept(self) -> None:
        self._gate.set()

    async def accept(self) -> None:
        self.accepting.set()
        await self._gate.wait()
        await super().accept()


# -- a checkpoint (and maybe a cancellation) at every await


class CheckpointCancel:
    """Numbers every await of a :class:`CheckpointBackend` and its checkpoint transports.

    Each await is one or more real checkpoints (``turns(label)`` of them, 1 by default).
    While armed with :meth:`arm`, the ``at``-th point (counted from 0 since arming) first
    cancels ``scope``, so that the code awaiting there is cancelled right at that await.
    """

    def __init__(self, turns: Callable[[str], int] | None = None) -> None:
        self.turns = turns
        self.count = 0
        """Points reached since :meth:`arm`."""
        self.labels: list[str] = []
        """The label of each point reached since :meth:`arm`, in order."""
        self._scope: anyio.CancelScope | None = None
        self._at: int | None = None

    def arm(self, scope: anyio.CancelScope, at: int) -> None:
        """Cancel ``scope`` at the ``at``-th point from now."""
        self.count = 0
        self.labels = []
        self._scope = scope
        self._at = at

    def disarm(self) -> None:
        self._scope = None
        self._at = None

    @property
    def reached(self) -> bool:
        """Whether the point to cancel at was reached (so far) since arming."""
        return self._at is not None and self.count > self._at

    async def point(self, label: str) -> None:
        index = self.count
        self.count += 1
        self.labels.append(label)
        if self._scope is not None and index == self._at:
            self._scope.cancel()
        for _ in range(1 if self.turns is None else self.turns(label)):
            await anyio.lowlevel.checkpoint()


class CheckpointBackend(MemoryBackend):
    """A :class:`MemoryBackend` with a :class:`CheckpointCancel` point before and after each
    of its async methods."""

    def __init__(self, harness: CheckpointCancel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.harness = harness

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        await self.harness.point("subscribe:before")
        subscription = await super().subscribe(room, listener, on_reset)
        await self.harness.point("subscribe:after")
        return subscription

    async def add_presence(self, room: str, client_id: str) -> bool:
        await self.harness.point("add_presence:before")
        first = await super().add_presence(room, client_id)
        await self.harness.point("add_presence:after")
        return first

    async def remove_presence(self, room: str, client_id: str) -> bool:
        await self.harness.point("remove_presence:before")
        last = await super().remove_presence(room, client_id)
        await self.harness.point("remove_presence:after")
        return last

    async def publish_draft(self, draft: Draft) -> Envelope:
        await self.harness.point("publish_draft:before")
        envelope = await super().publish_draft(draft)
        await self.harness.point("publish_draft:after")
        return envelope

    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        await self.harness.point("history:before")
        history = await super().history(room, since, epoch)
        await self.harness.point("history:after")
        return history

    async def presence(self, room: str) -> list[str]:
        await self.harness.point("presence:before")
        members = await super().presence(room)
        await self.harness.point("presence:after")
        return members


class CheckpointTransport:
    """Wraps a :class:`MemoryTransport`: a :class:`CheckpointCancel` point before and after
    each of ``accept``, ``send_text`` and ``close``."""

    def __init__(self, inner: MemoryTransport, harness: CheckpointCancel) -> None:
        self.inner = inner
        self.harness = harness

    async def accept(self) -> None:
        await self.harness.point("accept:before")
        await self.inner.accept()
        await self.harness.point("accept:after")

    async def send_text(self, data: str, /) -> None:
        await self.harness.point("send_text:before")
        await self.inner.send_text(data)
        await self.harness.point("send_text:after")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.harness.point("close:before")
        await self.inner.close(code, reason)
        await self.harness.point("close:after")


class CheckpointBatchTransport(CheckpointTransport):
    """Wraps a :class:`MemoryBatchTransport`: the fast path, with ``send_batch`` counted too
    (``send_batch_nowait`` does not wait, so it is passed through)."""

    inner: MemoryBatchTransport

    def __init__(self, inner: MemoryBatchTransport, harness: CheckpointCancel) -> None:
        super().__init__(inner, harness)

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        await self.harness.point("send_batch:before")
        await self.inner.send_batch(messages)
        await self.harness.point("send_batch:after")

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        return self.inner.send_batch_nowait(messages)


class GatedSubscribeBackend(MemoryBackend):
    """A :class:`MemoryBackend` whose next ``subscribe`` waits for the test once :meth:`hold`
    was called: ``subscribing`` is set when it is waiting, :meth:`let_go` lets it go on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold = False
        self.subscribing = anyio.Event()
        self._gate = anyio.Event()

    def hold(self) -> None:
        self._hold = True

    def let_go(self) -> None:
        self._gate.set()

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        if self._hold:
            self._hold = False
            self.subscribing.set()
            await self._gate.wait()
        return await super().subscribe(room, listener, on_reset)


async def stall_one_of_two(
    manager: ConnectionManager, broadcasts: int = 20
) -> tuple[MemoryTransport, MemoryTransport, Connection]:
    """A stalled client (paused before it joined) and a healthy one in ``lobby``; the healthy
    one broadcasts ``broadcasts`` times, each received before the next, until the stalled one's
    queue overflows and it is closed. Returns (stalled, healthy, the stalled connection)."""
    stalled, healthy = MemoryTransport(), MemoryTransport()
    stalled.pause()
    connection = await manager.connect(stalled, "stalled")
    await manager.connect(healthy, "healthy")
    for n in range(broadcasts):
        # Every broadcast returns while the stalled socket has not accepted a byte.
        await manager.broadcast("lobby", n, "healthy")

        def delivered(transport: MemoryTransport, n: int = n) -> bool:
            return any(e["data"] == n for e in transport.envelopes())

        await healthy.wait_until(delivered)
    await connection.wait_closed()
    return stalled, healthy, connection
