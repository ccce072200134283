"""One WebSocket connection as the manager sees it: a bounded outbound queue and its policy.

The queue is filled synchronously by broadcasts (which never wait for a socket) and drained
by one writer task per connection (which is the only code that waits for this socket).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from pydantic import JsonValue

from .envelope import Envelope
from .protocol import CloseCode, control_frame, error_frame
from .transport import Transport

__all__ = ["Connection", "ConnectionState", "ConnectionStatistics", "SlowConsumerPolicy"]

_ids = itertools.count(1)


class SlowConsumerPolicy(str, enum.Enum):
    """What happens when a connection's outbound queue is full and another frame arrives.

    ``DISCONNECT`` (the default) closes the connection with close code ``4008``
    (:attr:`~wsbroadcast.CloseCode.SLOW_CONSUMER`): the client knows it fell behind and can
    reconnect with ``since`` to recover what it missed from history. ``DROP_OLDEST`` keeps the
    connection and discards the oldest queued frame: the client sees a gap in ``seq`` and can
    resume from its last seq. Neither policy ever makes a broadcast wait.
    """

    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop_oldest"


class ConnectionState(enum.Enum):
    """Where a connection is in its life. It only ever moves forward."""

    RECOVERING = "recovering"
    """Accepted; replaying history. Live frames wait in a bounded buffer meanwhile."""
    OPEN = "open"
    """Receiving the live stream."""
    CLOSING = "closing"
    """No longer receiving; the socket is being closed and presence updated."""
    CLOSED = "closed"
    """Gone: removed from its room, socket closed, ``leave`` announced if it was the last."""


@dataclass(frozen=True)
class ConnectionStatistics:
    """A snapshot of one connection's queue, like anyio's ``MemoryObjectStreamStatistics``."""

    state: ConnectionState
    queued: int
    """Frames waiting in the outbound queue now."""
    queue_size: int
    delivered: int
    """Frames written to the transport."""
    dropped: int
    """Frames that were queued but never written (drop_oldest, or still queued at close)."""


class Connection:
    """A client's connection to one room, created by :meth:`ConnectionManager.connect`.

    Applications read ``client_id``, ``room`` and ``state``, send one-off frames to this client
    only with :meth:`send_error` or :meth:`send_control`, and wait for the end with
    :meth:`wait_closed`. The queue and writer belong to the manager.
    """

    def __init__(
        self,
        transport: Transport,
        client_id: str,
        room: str,
        queue_size: int,
        policy: SlowConsumerPolicy,
        on_ready: Callable[[Connection], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.transport = transport
        self.client_id = client_id
        self.room = room
        self.state = ConnectionState.RECOVERING
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.last_seq = 0
        """The seq of the newest envelope queued for this client (0 before the first)."""
        self._queue_size = queue_size
        self._policy = policy
        self._queue: deque[Envelope | str] = deque()
        self._pending: deque[Envelope | str] = deque()
        self._wakeup: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._transport_dead = False
        self._finishing = False
        # Set for transports that can write without waiting: the manager's flusher then
        # writes this connection's frames from one task, once per burst, instead of waking
        # its writer, which stays for the moments the socket is full.
        self._send_nowait: Callable[[Sequence[Envelope | str]], bool] | None = getattr(
            transport, "send_batch_nowait", None
        )
        self._on_ready = on_ready if self._send_nowait is not None else None
        self._ready = False
        self._present = False
        self._closed = anyio.Event()
        self._delivered = 0
        self._dropped = 0
        self.overflowed = False
        """True once the queue overflowed under the ``disconnect`` policy."""

    def __repr__(self) -> str:
        return (
            f"<Connection #{self.id} client_id={self.client_id!r} room={self.room!r}"
            f" {self.state.value}>"
        )

    def statistics(self) -> ConnectionStatistics:
        """Return the queue's current length and this connection's counters."""
        return ConnectionStatistics(
            self.state,
            len(self._queue) + len(self._pending),
            self._queue_size,
            self._delivered,
            self._dropped,
        )

    def send_control(self, type: str, data: JsonValue = None) -> bool:
        """Queue an unsequenced frame ``{"type", "room", "data"}`` for this client only.

        Returns false if the connection is closing. It goes through the same bounded queue and
        policy as broadcasts, so it is delivered in order with them and never blocks.
        """
        return self._push_text(control_frame(type, self.room, data))

    def send_error(self, code: str, detail: str) -> bool:
        """Queue ``{"type": "error", "room", "data": {"code", "detail"}}`` for this client only."""
        return self._push_text(error_frame(code, detail, self.room))

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed (socket closed, presence updated)."""
        await self._closed.wait()

    # The methods below belong to the manager.

    def _push(self, envelope: Envelope) -> None:
        """Queue one shared envelope; called by the room's fan-out, never blocks."""
        state = self.state
        if state is ConnectionState.OPEN:
            seq = envelope.seq
            if seq <= self.last_seq:
                return
            self.last_seq = seq
            self._append(envelope)
        elif state is ConnectionState.RECOVERING:
            pending = self._pending
            if len(pending) >= self._queue_size and not self._make_room(pending):
                return
            pending.append(envelope)

    def _push_text(self, text: str) -> bool:
        if self.state is ConnectionState.OPEN:
            self._append(text)
            return True
        if self.state is ConnectionState.RECOVERING:
            pending = self._pending
            if len(pending) >= self._queue_size and not self._make_room(pending):
                return False
            pending.append(text)
            return True
        return False

    def _append(self, item: Envelope | str) -> None:
        queue = self._queue
        if len(queue) >= self._queue_size and not self._make_room(queue):
            return
        queue.append(item)
        wakeup = self._wakeup
        if wakeup is not None:
            on_ready = self._on_ready
            if on_ready is None:
                self._wakeup = None
                wakeup.set()
            elif not self._ready:
                self._ready = True
                on_ready(self)

    def _flush(self) -> None:
        """Write everything queued without waiting, or wake the writer; called by the flusher."""
        self._ready = False
        wakeup = self._wakeup
        if not self._queue or wakeup is None or self.state is not ConnectionState.OPEN:
            return
        batch = self._queue
        assert self._send_nowait is not None
        if self._send_nowait(batch):
            self._queue = deque()
            self._delivered += len(batch)
        else:
            self._wakeup = None
            wakeup.set()

    def _make_room(self, queue: deque[Envelope | str]) -> bool:
        """Apply the slow-consumer policy to a full queue; true if there is now room."""
        if self._policy is SlowConsumerPolicy.DROP_OLDEST:
            queue.popleft()
            self._dropped += 1
            return True
        self.overflowed = True
        self._abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue full")
        return False

    def _abort(self, code: int, reason: str) -> None:
        """Stop delivering at once and hand the connection to its closing; never blocks."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self.state = ConnectionState.CLOSING
        self.close_code = code
        self.close_reason = reason
        self._dropped += len(self._queue) + len(self._pending)
        self._queue.clear()
        self._pending.clear()
        if self._scope is not None:
            self._scope.cancel()

    def _open_scope(self) -> anyio.CancelScope:
        """A cancel scope for the task that is writing to this socket; ``_abort`` cancels it."""
        scope = self._scope = anyio.CancelScope()
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            scope.cancel()
        return scope

    def _go_live(self, after_seq: int) -> None:
        """End recovery: queue buffered live frames newer than ``after_seq``, then go live."""
        self.state = ConnectionState.OPEN
        self.last_seq = max(self.last_seq, after_seq)
        pending, self._pending = self._pending, deque()
        for item in pending:
            if isinstance(item, str):
                self._append(item)
            else:
                self._push(item)

    async def _drain(self) -> None:
        """The writer: send queued frames in order until cancelled or the socket fails.

        A :class:`~wsbroadcast.transport.BatchTransport` gets everything waiting in one call;
        any other transport gets one ``send_text`` per frame.
        """
        send_batch = getattr(self.transport, "send_batch", None)
        if send_batch is not None:
            while True:
                while not self._queue:
                    wakeup = self._wakeup = anyio.Event()
                    await wakeup.wait()
                batch, self._queue = self._queue, deque()
                await send_batch(batch)
                self._delivered += len(batch)
        queue = self._queue
        send = self.transport.send_text
        while True:
            while not queue:
                wakeup = self._wakeup = anyio.Event()
                await wakeup.wait()
            item = queue.popleft()
            await send(item if isinstance(item, str) else item.text)
            self._delivered += 1
