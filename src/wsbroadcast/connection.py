"""One WebSocket connection: a sans-I/O `OutboundQueue` and the
I/O that drains it into the transport.

The queue decides (what to send, what to drop, when to give up); this module only writes:
`Connection.write` is the writer, run by the manager in a task while the connection
needs one, and `Connection.flush` the no-wait write its flusher makes. Closing is not
done here: the queue's abort hands the connection to the manager, which owns its cleanup.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from types import TracebackType

import anyio
from pydantic import JsonValue

from .control import ControlMessage
from .outbound import (
    ConnectionState,
    OutboundMessage,
    OutboundQueue,
    QueueStatistics,
    SlowConsumerPolicy,
)
from .transports.base import BatchTransport, NowaitBatchTransport, Transport

__all__ = ["Connection", "ConnectionState", "ConnectionStatistics", "SlowConsumerPolicy"]

ConnectionStatistics = QueueStatistics
"""A snapshot of one connection's queue and counters (see `QueueStatistics`)."""

_ids = itertools.count(1)


class Connection:
    """A client's connection, created by `ConnectionManager.connect` in one room and
    joined to more with `ConnectionManager.join`.

    Applications read ``client_id``, ``room`` (the first room), ``rooms`` and ``state``, send
    control messages to this client only with `send_error` or `send_control`, stop
    their receive loop with `cancel_on_close` and wait for the end with
    `wait_closed`.
    """

    # An idle connection is the common case (most sockets of a chat server wait for their
    # next message), so it holds no task, no event and no preallocated buffer.
    __slots__ = (
        "__weakref__",
        "_cancel_on_close",
        "_closed",
        "_on_abort",
        "_on_ready",
        "_space",
        "_wakeup",
        "_writer_done",
        "_writer_scope",
        "client_id",
        "id",
        "queue",
        "room",
        "send_batch",
        "send_nowait",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        client_id: str,
        room: str,
        *,
        queue_size: int,
        queue_bytes: int,
        policy: SlowConsumerPolicy,
        on_ready: Callable[[Connection], None],
        on_abort: Callable[[Connection], None],
    ) -> None:
        self.id = next(_ids)
        self.transport = transport
        self.client_id = client_id
        self.room = room
        self.send_nowait = (
            transport.send_batch_nowait if isinstance(transport, NowaitBatchTransport) else None
        )
        """Set for transports that write without waiting: the manager's flusher writes this
        connection's frames, and a writer task runs only while its socket is full."""
        self.send_batch = transport.send_batch if isinstance(transport, BatchTransport) else None
        self.queue = OutboundQueue(
            room,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            policy=policy,
            on_ready=self._wake if self.send_nowait is None else self._ready,
            on_abort=self._aborted,
        )
        self._on_ready = on_ready
        self._on_abort = on_abort
        self._wakeup: anyio.Event | None = None
        self._writer_scope: anyio.CancelScope | None = None
        self._writer_done: anyio.Event | None = None
        self._closed: anyio.Event | None = None
        self._space: anyio.Event | None = None
        self._cancel_on_close: list[anyio.CancelScope] | None = None

    def __repr__(self) -> str:
        return (
            f"<Connection #{self.id} client_id={self.client_id!r} room={self.room!r}"
            f" {self.state.value}>"
        )

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms the connection is in (or joining): the first ``room`` until it is left,
        and those `ConnectionManager.join` added."""
        return self.queue.rooms

    def in_room(self, room: str) -> bool:
        """Whether the connection is in ``room`` (or joining it): ``room in rooms``, without
        building the set, for a check on every message."""
        return self.queue.follows(room)

    @property
    def state(self) -> ConnectionState:
        """Where the connection is in its life."""
        return self.queue.state

    @property
    def close_code(self) -> int | None:
        """The close code the connection was (or is being) closed with."""
        return self.queue.close_code

    @property
    def close_reason(self) -> str | None:
        """The close reason the connection was (or is being) closed with."""
        return self.queue.close_reason

    @property
    def last_seq(self) -> int:
        """The seq of the newest envelope queued for this client (0 before the first)."""
        return self.queue.last_seq

    @property
    def overflowed(self) -> bool:
        """True once the queue overflowed under the ``disconnect`` policy."""
        return self.queue.overflowed

    def statistics(self) -> ConnectionStatistics:
        """Return the queue's current length and size and this connection's counters."""
        return self.queue.statistics()

    def send_control(self, type: str, data: JsonValue = None, room: str | None = None) -> bool:
        """Queue the control message ``{"type", "room", "data"}`` for this client only
        (``room`` defaults to the first room).

        Returns false if the connection is closing. It goes through the same bounded queue and
        policy as broadcasts, so it is delivered in order with them and never blocks.
        """
        return self.queue.push_control(type, data, room)

    def send_error(self, code: str, detail: str, room: str | None = None) -> bool:
        """Queue ``{"type": "error", "room", "data": {"code", "detail"}}`` for this client only
        (``room`` defaults to the first room)."""
        message = ControlMessage.error(code, detail, self.room if room is None else room)
        return self.queue.push_message(message)

    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed (presence updated, socket closed or
        given up on after the manager's ``close_timeout``)."""
        if self.state is ConnectionState.CLOSED:
            return
        if self._closed is None:
            self._closed = anyio.Event()
        await self._closed.wait()

    def cancel_on_close(self) -> contextlib.AbstractContextManager[anyio.CancelScope]:
        """A cancel scope that is cancelled when the connection stops receiving frames.

        Wrap the code that receives from the client in it, so that it stops as soon as the
        manager closes the connection by itself (slow consumer, a dead socket, shutdown)
        without a task that watches `wait_closed`::

            with connection.cancel_on_close():
                async for frame in websocket.iter_text():
                    ...

        It is cancelled at once if the connection is already closing.
        """
        return _CancelOnClose(self)

    # -- I/O, run by the manager

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()

    def _made_space(self) -> None:
        space = self._space
        if space is not None:
            self._space = None
            space.set()

    def _ready(self) -> None:
        self._on_ready(self)

    def _aborted(self) -> None:
        for scope in self._cancel_on_close or ():
            scope.cancel()
        if self._writer_scope is not None:
            self._writer_scope.cancel()
        self._wake()
        self._made_space()
        self._on_abort(self)

    def flush(self) -> bool:
        """Write everything queued without waiting (the flusher's write).

        Returns false if the socket cannot take it now: the connection then needs a writer,
        which waits for the socket. Raises what the transport raises.
        """
        assert self.send_nowait is not None
        queue = self.queue
        batch = queue.peek()
        if batch and not self.send_nowait(batch):
            return False
        queue.flushed()
        if self._space is not None:
            self._made_space()
        return True

    @property
    def writing(self) -> bool:
        """Whether a writer is running for this connection."""
        return self._writer_done is not None and not self._writer_done.is_set()

    async def wait_writer(self) -> None:
        """Wait until no writer runs for this connection."""
        if self._writer_done is not None:
            await self._writer_done.wait()

    async def write(self) -> None:
        """The writer: send queued frames in order until the queue closes.

        A `BatchTransport` gets everything waiting in one call;
        any other transport one ``send_text`` per frame. For a transport that can write
        without waiting, the writer returns once the queue is empty: the flusher takes over.
        Returns when cancelled by the queue's abort; raises what the transport raises.
        """
        done = self._writer_done = anyio.Event()
        try:
            with anyio.CancelScope() as scope:
                self._writer_scope = scope
                if self.queue.closing:
                    scope.cancel()
                await self._write_until_idle()
        finally:
            self._writer_scope = None
            done.set()

    async def _write_until_idle(self) -> None:
        queue = self.queue
        send_batch = self.send_batch
        nowait = self.send_nowait is not None
        # anyio.Event() finds the running backend on every call, which costs more than the
        # event itself; a writer makes one per wake-up, so it looks the class up once.
        new_event = type(anyio.Event())
        while not queue.closing:
            batch = queue.take()
            if not batch:
                if nowait:
                    return
                wakeup = self._wakeup = new_event()
                await wakeup.wait()
                continue
            if self._space is not None:
                self._made_space()
            if send_batch is not None:
                await send_batch(batch)
                queue.sent(len(batch))
            else:
                send = self.transport.send_text
                for message in batch:
                    await send(message.text)
                    queue.sent(1)

    async def send_now(self, messages: Sequence[OutboundMessage]) -> None:
        """Send `messages` straight to the socket, bypassing the queue (history replay)."""
        send = self.transport.send_text
        for message in messages:
            await send(message.text)
            self.queue.count_delivered(1)

    async def replay(self, items: Sequence[OutboundMessage]) -> bool:
        """Queue a recovering room's history, waiting while the queue is full (the joining
        client's own frames wait for its socket; nothing else does). False if the
        connection closed first."""
        queue = self.queue
        for item in items:
            while not queue.fits(item):
                if queue.closing:
                    return False
                space = self._space = anyio.Event()
                await space.wait()
            if not queue.push_replay(item):
                return False
        return not queue.closing

    def set_closed(self) -> None:
        """Called by the manager once closing is done: ``state`` becomes ``CLOSED`` and
        `wait_closed` returns."""
        self.queue.set_closed()
        if self._closed is not None:
            self._closed.set()


class _CancelOnClose:
    """`Connection.cancel_on_close`'s context manager. A class, not a generator: the block
    usually lasts as long as the connection, and a generator-based one would keep a
    generator and its frame alive for all that time (about 350 bytes)."""

    __slots__ = ("_connection", "_scope")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._scope: anyio.CancelScope | None = None

    def __enter__(self) -> anyio.CancelScope:
        scope = self._scope = anyio.CancelScope().__enter__()
        connection = self._connection
        if connection.queue.closing:
            scope.cancel()
        else:
            if connection._cancel_on_close is None:
                connection._cancel_on_close = []
            connection._cancel_on_close.append(scope)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        scope = self._scope
        assert scope is not None, "exited without entering"
        scopes = self._connection._cancel_on_close
        if scopes is not None and scope in scopes:
            scopes.remove(scope)
        return scope.__exit__(exc_type, exc, traceback)
