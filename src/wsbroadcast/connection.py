"""One WebSocket connection as the manager sees it: a bounded outbound queue and its policy.

The queue is filled synchronously by broadcasts (which never wait for a socket) and drained
by one writer task per connection (which is the only code that waits for this socket).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import anyio
from pydantic import JsonValue

from .backend import StreamReset
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

    # An idle connection is the common case (most sockets of a chat server wait for their
    # next message), so it holds no task, no event and no preallocated buffer.
    __slots__ = (
        "__weakref__",
        "_cancel_on_close",
        "_closed",
        "_delivered",
        "_dropped",
        "_finishing",
        "_on_idle_abort",
        "_on_ready",
        "_pending",
        "_policy",
        "_present",
        "_queue",
        "_queue_size",
        "_ready",
        "_scope",
        "_send_nowait",
        "_transport_dead",
        "_unsent",
        "_wakeup",
        "client_id",
        "close_code",
        "close_reason",
        "id",
        "last_seq",
        "overflowed",
        "room",
        "state",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        client_id: str,
        room: str,
        queue_size: int,
        policy: SlowConsumerPolicy,
        on_ready: Callable[[Connection], None] | None = None,
        on_idle_abort: Callable[[Connection], None] | None = None,
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
        self._queue: list[Envelope | str] = []
        self._pending: list[Envelope | str] = []
        self._unsent = 0
        """Frames taken from the queue by the writer and not yet written."""
        self._wakeup: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._transport_dead = False
        self._finishing = False
        # Set for transports that can write without waiting: the manager's flusher then
        # writes this connection's frames from one task, once per burst, and a writer task
        # exists only while the socket is full.
        self._send_nowait: Callable[[Sequence[Envelope | str]], bool] | None = getattr(
            transport, "send_batch_nowait", None
        )
        nowait = self._send_nowait is not None
        self._on_ready = on_ready if nowait else None
        self._on_idle_abort = on_idle_abort if nowait else None
        self._ready = False
        """Handed to the flusher, or to a writer task, which will write the queue."""
        self._present = False
        self._closed: anyio.Event | None = None
        self._cancel_on_close: list[anyio.CancelScope] | None = None
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
            len(self._queue) + len(self._pending) + self._unsent,
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
        if self.state is ConnectionState.CLOSED:
            return
        if self._closed is None:
            self._closed = anyio.Event()
        await self._closed.wait()

    @contextlib.contextmanager
    def cancel_on_close(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that the manager cancels when it stops delivering to this connection.

        Wrap the code that receives from the client in it, so that it stops as soon as the
        manager closes the connection by itself (slow consumer, a dead socket, shutdown)
        without a task that watches :meth:`wait_closed`::

            with connection.cancel_on_close():
                async for frame in websocket.iter_text():
                    ...

        It is cancelled at once if the connection is already closing.
        """
        with anyio.CancelScope() as scope:
            if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
                scope.cancel()
            else:
                if self._cancel_on_close is None:
                    self._cancel_on_close = []
                self._cancel_on_close.append(scope)
            try:
                yield scope
            finally:
                if self._cancel_on_close is not None and scope in self._cancel_on_close:
                    self._cancel_on_close.remove(scope)

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
            self._buffer(envelope)

    def _reset(self, reset: StreamReset) -> None:
        """The stream was reset: tell the client ``history_lost`` before the new stream."""
        lost: dict[str, JsonValue] = {
            "since": self.last_seq,
            "epoch": reset.epoch,
            "first_seq": reset.after_seq + 1,
            "last_seq": reset.after_seq,
        }
        text = control_frame("history_lost", self.room, lost)
        if self.state is ConnectionState.OPEN:
            self.last_seq = reset.after_seq
            self._append(text)
        elif self.state is ConnectionState.RECOVERING:
            self._buffer(text)

    def _push_text(self, text: str) -> bool:
        if self.state is ConnectionState.OPEN:
            self._append(text)
            return True
        if self.state is ConnectionState.RECOVERING:
            return self._buffer(text)
        return False

    def _buffer(self, item: Envelope | str) -> bool:
        """Hold a live frame while recovering, under the same bound and policy as the queue."""
        pending = self._pending
        if len(pending) >= self._queue_size and not self._make_room(pending):
            return False
        pending.append(item)
        return True

    def _append(self, item: Envelope | str) -> None:
        queue = self._queue
        if len(queue) >= self._queue_size and not self._make_room(queue):
            return
        queue.append(item)
        on_ready = self._on_ready
        if on_ready is None:
            wakeup = self._wakeup
            if wakeup is not None:
                self._wakeup = None
                wakeup.set()
        elif not self._ready:
            self._ready = True
            on_ready(self)

    def _flush(self) -> bool:
        """Write everything queued without waiting; called by the flusher.

        Returns false if the socket cannot take it now: the connection then needs a writer
        task, which waits for the socket (and stays ready until it has emptied the queue).
        """
        batch = self._queue
        if not batch or self.state is not ConnectionState.OPEN:
            self._ready = False
            return True
        assert self._send_nowait is not None
        if not self._send_nowait(batch):
            return False
        self._ready = False
        self._queue = []
        self._delivered += len(batch)
        return True

    def _make_room(self, queue: list[Envelope | str]) -> bool:
        """Apply the slow-consumer policy to a full queue; true if there is now room."""
        if self._policy is SlowConsumerPolicy.DROP_OLDEST:
            del queue[0]
            self._dropped += 1
            return True
        self.overflowed = True
        self._abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue full")
        return False

    def _abort(self, code: int, reason: str) -> None:
        """Stop delivering at once and hand the connection to its closing; never blocks."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        was_open = self.state is ConnectionState.OPEN
        self.state = ConnectionState.CLOSING
        self.close_code = code
        self.close_reason = reason
        self._dropped += len(self._queue) + len(self._pending) + self._unsent
        self._unsent = 0
        self._queue.clear()
        self._pending.clear()
        for scope in self._cancel_on_close or ():
            scope.cancel()
        if self._scope is not None:
            self._scope.cancel()
        elif was_open and self._on_idle_abort is not None:
            # No task is writing to this socket: the manager starts one to close it.
            self._on_idle_abort(self)

    @contextlib.contextmanager
    def _open_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope for the task that is writing to this socket; ``_abort`` cancels it."""
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None

    def _go_live(self, after_seq: int) -> None:
        """End recovery: queue buffered live frames newer than ``after_seq``, then go live."""
        self.state = ConnectionState.OPEN
        self.last_seq = max(self.last_seq, after_seq)
        pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, str):
                self._append(item)
            else:
                self._push(item)

    def _set_closed(self) -> None:
        self.state = ConnectionState.CLOSED
        if self._closed is not None:
            self._closed.set()

    async def _drain(self) -> None:
        """The writer: send queued frames in order until cancelled or the socket fails.

        A :class:`~wsbroadcast.transport.BatchTransport` gets everything waiting in one call;
        any other transport gets one ``send_text`` per frame. For a transport that can write
        without waiting, the writer returns once the queue is empty: the flusher takes over.
        """
        send_batch = getattr(self.transport, "send_batch", None)
        nowait = self._send_nowait is not None
        # anyio.Event() finds the running backend on every call, which costs more than the
        # event itself; a writer makes one per wake-up, so it looks the class up once.
        new_event = type(anyio.Event())
        while True:
            while not self._queue:
                if nowait:
                    self._ready = False
                    return
                wakeup = self._wakeup = new_event()
                await wakeup.wait()
            batch, self._queue = self._queue, []
            self._unsent = len(batch)
            if send_batch is not None:
                await send_batch(batch)
                self._unsent = 0
                self._delivered += len(batch)
            else:
                send = self.transport.send_text
                for item in batch:
                    await send(item if isinstance(item, str) else item.text)
                    self._unsent -= 1
                    self._delivered += 1
