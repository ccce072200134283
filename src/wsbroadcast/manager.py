"""The ConnectionManager: connects sockets to rooms and broadcasts without ever waiting on one.

How a broadcast travels::

    broadcast(room, data)  ->  Draft (validated and encoded once, before any seq is taken)
                                     |
                           backend.publish_draft  (assigns seq in the room's epoch, stores)
                                     |
               room listener (one per room with local members, called in seq order)
                                     |
             OutboundQueue.push, per member  (bounded in frames and bytes, no await)
                                     |
     the flusher (no-wait transports) or the connection's writer  ->  the socket

A slow or dead client only ever fills its own queue; what happens then is the connection's
`SlowConsumerPolicy`.

Who cleans up: while `ConnectionManager.connect` runs, the connecting task owns its
connection; once connected, the manager does. Whatever ends a connection (the application,
its queue's policy, a send that failed, shutdown) aborts its queue, which hands it to exactly
one closer: it leaves the room, removes presence and announces ``leave``, stops the writer
and closes the socket, each step bounded by ``close_timeout`` and shielded from cancellation,
so that ``wait_closed()`` always returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from pydantic import JsonValue

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

from ._deprecated import renamed_names, warn_renamed
from ._validation import check_name, check_publication
from .backends.base import Backend, StreamReset, Subscription, backend_from_url
from .connection import Connection, ConnectionState
from .control import RESERVED_TYPES, CloseCode, ControlMessage
from .envelope import EPOCH_PATTERN, Draft, Envelope, direct_drafts
from .exceptions import (
    AlreadyJoined,
    BackendError,
    BackendUnavailable,
    Forbidden,
    InvalidInput,
    ManagerNotRunning,
    NotJoined,
)
from .names import is_user_room
from .outbound import DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_SIZE, OutboundMessage, SlowConsumerPolicy
from .transports.base import Transport

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "RESERVED_TYPES",
    "ConnectionManager",
    "ManagerStatistics",
]

logger = logging.getLogger("wsbroadcast")


_T = TypeVar("_T")


@dataclass(frozen=True)
class ManagerStatistics:
    """Counters of one `ConnectionManager` since it started (gauges are current)."""

    connections: int
    """Open connections now, connecting ones included (gauge)."""
    rooms: int
    """Rooms with at least one local connection now (gauge)."""
    published: int
    """Envelopes published through this manager (broadcasts, joins and leaves)."""
    delivered: int
    """Frames written to sockets."""
    dropped: int
    """Frames queued for a connection but never written to it."""
    slow_consumer_disconnects: int
    """Connections closed with 4008 because their queue was full."""
    send_failures: int
    """Connections closed because a send raised (the peer was gone)."""
    departures_lost: int = 0
    """Departures the backend could not record in time: presence may still list the client
    until the backend's own expiry (Redis: the node's heartbeat), and its ``leave`` may be
    announced late or not at all."""
    close_timeouts: int = 0
    """Sockets whose close did not finish within ``close_timeout`` and were given up on."""


class _LocalRoom:
    """A room with local members, subscribed to the backend while it has any."""

    __slots__ = ("entering", "members", "name", "ready", "snapshot", "subscription")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Connection] = set()
        self.snapshot: tuple[Connection, ...] = ()
        self.subscription: Subscription | None = None
        self.ready: anyio.Event | None = None
        """Made by a connect that waits while another subscribes the room (rare)."""
        self.entering = 0

    def fan_out(self, envelope: Envelope) -> None:
        """The backend's listener: queue ``envelope`` for every member, never blocking."""
        for connection in self.snapshot:
            try:
                connection.queue.push(envelope)
            except Exception:  # a bug, never the payload's fault: close, never skip silently
                logger.exception("could not queue %r for %r; closing it", envelope.seq, connection)
                connection.queue.abort(CloseCode.INTERNAL_ERROR, "internal error")

    def reset(self, reset: StreamReset) -> None:
        """The backend's reset listener: ``history_lost`` to every member, before the rest."""
        for connection in self.snapshot:
            connection.queue.reset(reset.epoch, reset.after_seq, self.name)

    def add(self, connection: Connection) -> None:
        self.members.add(connection)
        self.snapshot = tuple(self.members)

    def discard(self, connection: Connection) -> None:
        self.members.discard(connection)
        self.snapshot = tuple(self.members)


class _Joins:
    """The joins under way on one connection, so that its closer can cancel and await them."""

    __slots__ = ("done", "scopes")

    def __init__(self) -> None:
        self.scopes: set[anyio.CancelScope] = set()
        self.done = anyio.Event()

    async def wait(self) -> None:
        await self.done.wait()


def _check_room(room: str, client_id: str) -> bool:
    """Check a room a client connects to or joins; true if it is its own personal stream."""
    if isinstance(room, str) and is_user_room(room):
        if room[1:] != client_id:
            raise Forbidden(f"room {room!r} is another client's personal stream")
        return True
    check_name("room", room)
    return False


def _check_position(since: object, epoch: object) -> None:
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise InvalidInput(f"since must be a non-negative integer, not {since!r}")
    if epoch is not None and (not isinstance(epoch, str) or EPOCH_PATTERN.fullmatch(epoch) is None):
        raise InvalidInput(f"epoch must be 1-32 of A-Z a-z 0-9 _ -, not {epoch!r}")


class ConnectionManager:
    """Connects WebSockets to rooms and broadcasts to them, in order, without head-of-line blocking.

    Use it as ``async with ConnectionManager() as manager:``; its writer tasks live in an anyio
    task group, so it runs on asyncio and trio. Leaving the block, however it is left
    (return, exception, cancellation), closes every connection with 1001 (Going Away),
    announces the departures and returns within a bound set by ``close_timeout``.

    :param backend: a `Backend` or a URL for
        `backend_from_url` (default ``memory://``).
    :param queue_size: frames each connection may have waiting (default 1,024) ...
    :param queue_bytes: ... and bytes (default 1 MiB). A full queue triggers
        ``slow_consumer``.
    :param slow_consumer: ``"disconnect"`` (default: close with 4008) or ``"drop_oldest"``.
    :param close_timeout: seconds each step of closing a connection may take (recording the
        departure in the backend, stopping its writer, closing its socket) before it is
        given up on; also the bound on a backend call that a connect must not abandon half
        way (presence and ``join``).
    :param announce: whether ``join`` and ``leave`` envelopes are published when a client
        arrives in or leaves a room: true (the default), false, or a function of the room
        name, so that large or quiet rooms can go without them. Presence answers either way.
        Every node of a room should say the same for it.
    """

    def __init__(
        self,
        backend: Backend | str = "memory://",
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        slow_consumer: SlowConsumerPolicy | str = SlowConsumerPolicy.DISCONNECT,
        close_timeout: float = 5.0,
        announce: bool | Callable[[str], bool] = True,
    ) -> None:
        if queue_size < 1:
            raise InvalidInput(f"queue_size must be at least 1, not {queue_size}")
        if queue_bytes < 1:
            raise InvalidInput(f"queue_bytes must be at least 1, not {queue_bytes}")
        if not close_timeout > 0:
            raise InvalidInput(f"close_timeout must be positive, not {close_timeout}")
        try:
            self.slow_consumer = SlowConsumerPolicy(slow_consumer)
        except ValueError:
            choices = ", ".join(repr(policy.value) for policy in SlowConsumerPolicy)
            raise InvalidInput(f"slow_consumer must be one of {choices}") from None
        self.backend = backend_from_url(backend) if isinstance(backend, str) else backend
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.close_timeout = close_timeout
        self._announce = announce
        self._task_group: TaskGroup | None = None
        self._running = False
        self._flush_ready: list[Connection] = []
        self._flush_wakeup: anyio.Event | None = None
        self._call_soon: Callable[[Callable[[], object]], object] | None = None
        """asyncio's ``loop.call_soon`` when on asyncio: the flusher is then a callback."""
        self._flush_scheduled = False
        self._handoff: list[tuple[Connection, Exception | None]] = []
        """Connections the callback could not write now (or whose write failed), for the
        flusher task: starting a writer or closing a connection needs a task's context."""
        self._rooms: dict[str, _LocalRoom] = {}
        self._connections: set[Connection] = set()
        """Connected: the manager owns their cleanup."""
        self._connecting: dict[Connection, anyio.CancelScope] = {}
        """Being connected: the connecting task owns their cleanup; abort cancels it."""
        self._connects_done: anyio.Event | None = None
        self._present: dict[Connection, set[str]] = {}
        """The rooms each connection is counted in by the backend's presence: the closer
        removes it from them."""
        self._joins: dict[Connection, _Joins] = {}
        """Joins under way per open connection: an abort cancels them, the closer awaits them."""
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._slow = 0
        self._send_failures = 0
        self._departures_lost = 0
        self._close_timeouts = 0
        self._backend_trouble = False

    # -- lifecycle

    async def __aenter__(self) -> ConnectionManager:
        if self._task_group is not None:
            raise RuntimeError("a ConnectionManager can only be entered once")
        await self.backend.__aenter__()
        task_group = anyio.create_task_group()
        try:
            await task_group.__aenter__()
        except BaseException:
            await self.backend.__aexit__(None, None, None)
            raise
        self._task_group = task_group
        self._running = True
        # Not on asyncio (trio): no loop to call back, the flusher task does every write.
        with contextlib.suppress(RuntimeError):
            self._call_soon = asyncio.get_running_loop().call_soon
        task_group.start_soon(self._run_flusher)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._running = False
        if self._flush_wakeup is not None:
            self._flush_wakeup.set()
        for connection in (*self._connections, *self._connecting):
            connection.queue.abort(CloseCode.GOING_AWAY, "server shutting down")
        assert self._task_group is not None
        try:
            return await self._task_group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The manager's tasks never raise, so a group holding only the body's own
            # exception is anyio's wrapping of it: let the caller see the original instead.
            if exc is not None and group.exceptions == (exc,):
                return None
            raise
        finally:
            # Connects still cleaning up (their own task owns that) use the backend.
            with anyio.CancelScope(shield=True), anyio.move_on_after(3 * self.close_timeout):
                while self._connecting:
                    self._connects_done = anyio.Event()
                    await self._connects_done.wait()
            # Not shielded here: a backend's own task group must exit in the scope it entered.
            await self.backend.__aexit__(exc_type, exc, tb)

    def announces(self, room: str) -> bool:
        """Whether ``join`` and ``leave`` are published in ``room`` (see ``announce``)."""
        announce = self._announce
        return announce if isinstance(announce, bool) else bool(announce(room))

    @property
    def running(self) -> bool:
        """True inside ``async with manager:``, until shutdown begins (for health checks)."""
        return self._running

    def _check_running(self) -> None:
        if not self._running:
            raise ManagerNotRunning("use the ConnectionManager inside 'async with manager:'")

    # -- connecting

    async def connect(
        self,
        transport: Transport,
        client_id: str,
        room: str = "lobby",
        since: int | None = None,
        epoch: str | None = None,
    ) -> Connection:
        """Accept ``transport`` and subscribe it to ``room``; announce ``join`` if it is new.

        Without ``since`` the client's first frame is its own ``join`` (for a second tab of
        the same client, which announces nothing, the live stream from now), and nothing
        numbered before it follows. With ``since`` (the last seq the client saw; 0 for
        everything) and ``epoch`` (the epoch of that envelope), the client first gets the
        envelopes after ``since`` from history, then the live stream, with no gap and no
        duplicate. If history does not reach back that far, or the stream is not the one the
        epoch names (it was lost and restarted), it gets one unsequenced
        ``{"type": "history_lost", "data": {"since", "epoch", "first_seq", "last_seq"}}``
        frame instead, carrying the stream's current epoch, then the live stream from its
        ``join``: recovery is all or nothing.

        Cancelling a connect at any point leaks nothing: the connection is closed, it is in
        no room and in no presence, and a ``leave`` is announced only after its ``join``.
        Adding presence and publishing the ``join`` are done together or not at all.

        ``room`` may be the client's own personal stream (`user_room`): no
        presence, nothing announced.

        Raises `InvalidInput` (before accepting) for a bad room,
        client id, ``since`` or ``epoch``, and its subclass
        `Forbidden` for another client's personal stream;
        `ManagerNotRunning` outside ``async with``; and
        `BackendError` (after closing the socket with 1011) if
        the backend fails. If the socket dies or overflows, or the manager shuts down, during
        the connect, the returned connection is already closed.
        """
        self._check_running()
        check_name("client_id", client_id)
        _check_room(room, client_id)
        _check_position(since, epoch)
        connection = Connection(
            transport,
            client_id,
            room,
            queue_size=self.queue_size,
            queue_bytes=self.queue_bytes,
            policy=self.slow_consumer,
            on_ready=self._ready_to_flush,
            on_abort=self._aborted,
        )
        scope = anyio.CancelScope()
        self._connecting[connection] = scope
        try:
            with scope:
                after = await self._join(connection, since, epoch)
        except BaseException as exc:
            if isinstance(exc, BackendError):
                reason = "backend unavailable"
            else:
                reason = "connect failed" if isinstance(exc, Exception) else "connect cancelled"
            connection.queue.abort(CloseCode.INTERNAL_ERROR, reason)
            with anyio.CancelScope(shield=True):
                await self._close(connection)
            self._connect_done(connection)
            raise
        if connection.queue.closing:
            with anyio.CancelScope(shield=True):
                await self._close(connection)
            self._connect_done(connection)
            return connection
        # From here on the manager owns the connection; no await until it is registered.
        self._connect_done(connection)
        self._connections.add(connection)
        connection.queue.go_live(after)
        if connection.send_nowait is None and not connection.queue.closing:
            # Any other transport has a writer for as long as it is open.
            self._start_writer(connection)
        return connection

    def _connect_done(self, connection: Connection) -> None:
        del self._connecting[connection]
        if not self._connecting and self._connects_done is not None:
            self._connects_done.set()

    async def _join(self, connection: Connection, since: int | None, epoch: str | None) -> int:
        """Accept, enter the room, presence and ``join``, history; the seq live frames follow."""
        await connection.transport.accept()
        if not self._running:
            connection.queue.abort(CloseCode.GOING_AWAY, "server shutting down")
        # A scheduling point whatever the transport and backend do (and where a shutdown's
        # abort, which cancelled our scope, stops the connect).
        await anyio.lowlevel.checkpoint()
        room = connection.room
        await self._enter_room(connection, room)
        join = None
        if not is_user_room(room):
            join = await self._shielded(self._add_presence(connection, room))
        # The client's first frame is its own join: nothing numbered before it follows.
        after = join.seq - 1 if join is not None else 0
        if since is not None:
            messages, after, _ = await self._history(room, since, epoch, after)
            try:
                await connection.send_now(messages)
            except Exception as exc:  # the socket died: the connect returns it closed
                self._send_failed(connection, exc)
        return after

    async def _shielded(self, awaitable: Awaitable[_T]) -> _T:
        """Await a backend step that must not be abandoned half way (cancellation waits for
        it), bounded by ``close_timeout``."""
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(self.close_timeout):
                    result = await awaitable
            except TimeoutError:
                raise BackendUnavailable(
                    f"the backend did not answer within {self.close_timeout} s"
                ) from None
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancellation that waited for it
        return result

    async def _add_presence(self, connection: Connection, room: str) -> Envelope | None:
        """Count the connection in ``room``'s presence and announce ``join`` if it is the
        client's first; both or neither."""
        client_id = connection.client_id
        first = await self.backend.add_presence(room, client_id)
        self._present.setdefault(connection, set()).add(room)
        if not first or not self.announces(room):
            return None
        try:
            return await self._publish(room, "join", client_id, None)
        except BaseException:
            self._not_present(connection, room)
            with contextlib.suppress(Exception):
                await self.backend.remove_presence(room, client_id)
            raise

    async def _enter_room(self, connection: Connection, name: str) -> None:
        while True:
            room = self._rooms.get(name)
            if room is None:
                room = self._rooms[name] = _LocalRoom(name)
                try:
                    room.subscription = await self._shielded(
                        self.backend.subscribe(name, room.fan_out, room.reset)
                    )
                except BaseException:
                    del self._rooms[name]
                    raise
                finally:
                    if room.ready is not None:
                        room.ready.set()
                break
            if room.subscription is not None:
                break
            # Another connect is subscribing the room; if it fails, try again ourselves.
            room.entering += 1
            try:
                if room.ready is None:
                    room.ready = anyio.Event()
                await room.ready.wait()
            finally:
                room.entering -= 1
        room.add(connection)

    async def _history(
        self, room: str, since: int, epoch: str | None, after: int | None
    ) -> tuple[Sequence[OutboundMessage], int, str]:
        """What a client resuming ``room`` after ``since`` gets first (the envelopes, or one
        ``history_lost``), the seq that live frames then follow, and the stream's epoch.

        ``after`` is where live frames start without recovery (just before the client's own
        ``join``), None if nothing was announced (then: the stream's last seq).
        """
        history = await self.backend.history(room, since, epoch)
        if not history.complete:
            lost = ControlMessage.history_lost(
                room,
                since=since,
                epoch=history.epoch,
                first_seq=history.first_seq,
                last_seq=history.last_seq,
            )
            after = history.last_seq if after is None else after
            return [lost], after, history.epoch
        envelopes = history.envelopes
        if envelopes:
            after = envelopes[-1].seq
        elif after is None or since > after:
            after = since
        return envelopes, after, history.epoch

    @contextlib.asynccontextmanager
    async def session(
        self,
        transport: Transport,
        client_id: str,
        room: str = "lobby",
        since: int | None = None,
        epoch: str | None = None,
    ) -> AsyncIterator[Connection]:
        """`connect` for the length of an ``async with`` block, then `disconnect`.

        The block runs in `Connection.cancel_on_close`, so a receive loop in it stops
        when the manager closes the connection by itself (slow consumer, dead socket,
        shutdown)::

            async with manager.session(websocket, client_id, room) as connection:
                async for text in websocket.iter_text():
                    await manager.broadcast(room, {"message": text}, client_id)

        Leaving the block, however it is left, closes the connection (shielded from
        cancellation) and announces the departure. Raises what `connect` raises.
        """
        connection = await self.connect(transport, client_id, room, since, epoch)
        try:
            with connection.cancel_on_close():
                yield connection
        finally:
            with anyio.CancelScope(shield=True):
                await self.disconnect(connection)

    # -- rooms joined and left while open

    async def join(
        self,
        connection: Connection,
        room: str,
        since: int | None = None,
        epoch: str | None = None,
    ) -> None:
        """Add ``room`` to an open connection, with the same guarantees as `connect`.

        The client gets, in its one queue and in order: the envelopes of ``room`` after
        ``since`` from history (or one ``history_lost`` frame), then one unsequenced
        ``{"type": "joined", "room", "data": {"seq", "epoch"}}`` frame saying which seq of
        which stream it is now up to date with, then the room's live stream, with no gap and
        no duplicate; frames of its other rooms go on meanwhile. Presence and ``join`` as in
        `connect`. The history is queued under the connection's bounds: when they are
        full, this waits for the client to read (only this caller waits).

        A personal stream (`user_room`) may be joined by its own client
        only; it has no presence and announces nothing.

        Raises `InvalidName`, `InvalidInput` (bad
        ``since`` or ``epoch``), `AlreadyJoined`,
        `Forbidden` (another client's personal stream), with
        nothing changed; `BackendError` if the backend fails,
        the connection staying open and out of the room. Cancelled, it leaves the room again.
        If the connection closes meanwhile, returns (the closer cleans up).
        """
        self._check_running()
        personal = _check_room(room, connection.client_id)
        _check_position(since, epoch)
        if connection in self._connecting:
            raise RuntimeError("join a connection once connect() has returned it")
        queue = connection.queue
        if room in queue.rooms:
            raise AlreadyJoined(f"{connection!r} is in room {room!r} already")
        if connection not in self._connections or not queue.add_room(room):
            return  # closing: nothing to join
        joins = self._joins.get(connection)
        if joins is None:
            joins = self._joins[connection] = _Joins()
        scope = anyio.CancelScope()
        joins.scopes.add(scope)
        try:
            with scope:
                await self._join_room(connection, room, since, epoch, personal)
        except BaseException:
            if not queue.closing:  # else the closer, which waits for us, cleans up
                with anyio.CancelScope(shield=True):
                    await self._leave(connection, room, None)
            raise
        finally:
            joins.scopes.discard(scope)
            if not joins.scopes:
                del self._joins[connection]
                joins.done.set()

    async def _join_room(
        self,
        connection: Connection,
        room: str,
        since: int | None,
        epoch: str | None,
        personal: bool,
    ) -> None:
        await self._enter_room(connection, room)
        join = None if personal else await self._shielded(self._add_presence(connection, room))
        after = join.seq - 1 if join is not None else None
        messages: Sequence[OutboundMessage] = ()
        if since is not None:
            messages, after, stream = await self._history(room, since, epoch, after)
        elif join is not None:
            stream = join.epoch
        else:
            stream, after = await self._shielded(self.backend.position(room))
        assert after is not None
        if await connection.replay(messages):
            ack = ControlMessage.joined(room, seq=after, epoch=stream)
            connection.queue.room_live(room, after, ack)

    async def leave(self, connection: Connection, room: str) -> None:
        """Take ``room`` out of an open connection; its other rooms go on.

        The client gets ``{"type": "left", "room", "data": null}`` and no envelope of the room
        after it (those still queued are dropped). Presence and ``leave`` as when a connection
        closes. Raises `NotJoined` if the connection is not in
        ``room`` (or is still joining it). Returns at once on a closing connection.
        """
        queue = connection.queue
        if room not in queue.rooms or queue.recovering(room):
            raise NotJoined(f"{connection!r} is not in room {room!r}")
        if queue.closing or connection not in self._connections:
            return
        with anyio.CancelScope(shield=True):
            await self._leave(connection, room, ControlMessage.left(room))

    async def _leave(self, connection: Connection, room: str, ack: ControlMessage | None) -> None:
        connection.queue.remove_room(room, ack)
        await self._leave_room(connection, room)
        await self._depart_room(connection, room)

    # -- writing

    def _ready_to_flush(self, connection: Connection) -> None:
        self._flush_ready.append(connection)
        call_soon = self._call_soon
        if call_soon is None:
            self._wake_flusher()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            call_soon(self._flush_soon)

    def _wake_flusher(self) -> None:
        wakeup = self._flush_wakeup
        if wakeup is not None:
            self._flush_wakeup = None
            wakeup.set()

    def _flush_soon(self) -> None:
        # One more turn of the loop first, as the flusher task's checkpoint gives: what is
        # already runnable (frames read, publishes) adds to this pass's writes.
        assert self._call_soon is not None
        self._call_soon(self._flush_now)

    def _flush_now(self) -> None:
        """The pass, as an asyncio callback: cheaper than waking a task for every publish of
        a quiet room. What it hands off wakes the flusher task."""
        self._flush_scheduled = False
        if self._running:
            self._flush_pass()
            if self._handoff:
                self._wake_flusher()

    def _flush_pass(self) -> None:
        """Write the frames of every connection made ready since the last pass.

        Used for transports with ``send_batch_nowait``: one pass per burst of publishes,
        however many connections received them, writes each connection's waiting frames in
        one call. A connection whose socket cannot take them now, or whose write failed, is
        handed off to the flusher task: starting a writer or closing a connection needs a
        task's context, which an asyncio callback does not have.
        """
        ready, self._flush_ready = self._flush_ready, []
        handoff = self._handoff
        for connection in ready:
            try:
                if not connection.flush():
                    handoff.append((connection, None))
            except Exception as exc:
                handoff.append((connection, exc))

    async def _run_flusher(self) -> None:
        """The flusher task: starts writers and closes failed connections for what the pass
        handed off; where asyncio's ``call_soon`` is not at hand (trio) it also runs the
        pass, waking once per burst of publishes."""
        new_event = type(anyio.Event())  # looked up once: see Connection.write
        on_asyncio = self._call_soon is not None
        while self._running:
            if not self._handoff and (on_asyncio or not self._flush_ready):
                wakeup = self._flush_wakeup = new_event()
                await wakeup.wait()
                # Let what is already runnable (more frames read from the network, more
                # publishes) run first, so that each write carries more frames.
                await anyio.lowlevel.checkpoint()
                continue
            if not on_asyncio:
                self._flush_pass()
            handoff, self._handoff = self._handoff, []
            for connection, exc in handoff:
                if exc is not None:
                    self._send_failed(connection, exc)
                elif not connection.writing:
                    self._start_writer(connection)

    def _start_writer(self, connection: Connection) -> None:
        assert self._task_group is not None
        self._task_group.start_soon(self._run_writer, connection)

    async def _run_writer(self, connection: Connection) -> None:
        try:
            await connection.write()
        except Exception as exc:
            self._send_failed(connection, exc)

    def _send_failed(self, connection: Connection, exc: Exception) -> None:
        logger.debug("send to %r failed: %r", connection, exc)
        if connection.queue.closing:
            return
        self._send_failures += 1
        connection.queue.abort(CloseCode.GOING_AWAY, f"send failed: {type(exc).__name__}")

    # -- closing

    async def disconnect(
        self, connection: Connection, code: int = CloseCode.NORMAL, reason: str | None = None
    ) -> None:
        """Close ``connection``, remove it from its room and announce ``leave`` if it was the last.

        Frames still queued for it are dropped. Safe to call more than once and on a socket
        that is already dead: it never raises because of the socket. Returns once the
        connection is closed (see `Connection.wait_closed`).
        """
        connection.queue.abort(code, reason or "")
        await connection.wait_closed()

    def _aborted(self, connection: Connection) -> None:
        """The queue aborted: hand the connection to its one closer."""
        scope = self._connecting.get(connection)
        if scope is not None:
            scope.cancel()  # the connecting task closes it
        elif connection in self._connections:
            assert self._task_group is not None
            self._task_group.start_soon(self._close_task, connection)

    async def _close_task(self, connection: Connection) -> None:
        with anyio.CancelScope(shield=True):
            await self._close(connection)

    async def _close(self, connection: Connection) -> None:
        """Leave room and presence, announce ``leave``, close the socket; once per connection.

        The departure is announced before the socket is closed, so that the room learns of
        it at once even when the close frame waits behind a stalled client's full buffer or
        its writer is stuck in a send that ignores cancellation. Call it shielded.
        """
        try:
            joins = self._joins.get(connection)
            if joins is not None:
                with anyio.move_on_after(self.close_timeout):
                    await joins.wait()
            await self._leave_rooms(connection)
            await self._depart(connection)
            if connection.writing:
                with anyio.move_on_after(self.close_timeout):
                    await connection.wait_writer()
            # Even after a failed send: the socket may be half-open, and a transport's close
            # must not raise on a socket that is gone.
            await self._close_socket(connection)
        finally:
            if connection.overflowed:
                self._slow += 1
            self._connections.discard(connection)
            self._delivered += connection.queue.delivered
            self._dropped += connection.queue.dropped
            connection.set_closed()

    async def _depart(self, connection: Connection) -> None:
        """Remove the connection from the presence of every room it is counted in."""
        for room in list(self._present.get(connection, ())):
            await self._depart_room(connection, room)

    def _not_present(self, connection: Connection, room: str) -> None:
        rooms = self._present.get(connection)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._present[connection]

    async def _depart_room(self, connection: Connection, room: str) -> None:
        """Remove the connection from ``room``'s presence; announce ``leave`` if it was the
        client's last there."""
        if room not in self._present.get(connection, ()):
            return
        self._not_present(connection, room)
        try:
            with anyio.fail_after(self.close_timeout):
                last = await self.backend.remove_presence(room, connection.client_id)
                if last and self.announces(room):
                    await self._publish(room, "leave", connection.client_id, None)
        except (Exception, TimeoutError) as exc:
            self._departures_lost += 1
            if not self._backend_trouble:
                self._backend_trouble = True
                logger.warning(
                    "could not record the departure of %r (%r); more may follow until the "
                    "backend answers again",
                    connection,
                    exc,
                )
        else:
            self._backend_trouble = False

    async def _close_socket(self, connection: Connection) -> None:
        """Close the transport, giving up after ``close_timeout`` even if it ignores
        cancellation (then the close goes on in a task of the manager)."""
        done = anyio.Event()

        async def close() -> None:
            try:
                await connection.transport.close(
                    connection.close_code or CloseCode.NORMAL, connection.close_reason
                )
            except Exception as exc:
                logger.debug("closing %r failed: %r", connection, exc)
            finally:
                done.set()

        with anyio.move_on_after(self.close_timeout) as scope:
            if self._task_group is not None and self._running:
                self._task_group.start_soon(close)
                await done.wait()
            else:
                await close()
        if scope.cancelled_caught:
            self._close_timeouts += 1
            logger.info("%r did not close within %s s: given up", connection, self.close_timeout)

    async def _leave_rooms(self, connection: Connection) -> None:
        for name in connection.rooms:
            await self._leave_room(connection, name)

    async def _leave_room(self, connection: Connection, name: str) -> None:
        room = self._rooms.get(name)
        if room is None or connection not in room.members:
            return
        room.discard(connection)
        if not room.members and not room.entering and room.subscription is not None:
            del self._rooms[room.name]
            with anyio.move_on_after(self.close_timeout):
                await room.subscription.aclose()

    # -- publishing

    async def broadcast(
        self, room: str, data: JsonValue, client_id: str | None = None, type: str = "message"
    ) -> Envelope:
        """Publish ``data`` to everyone in ``room`` and return the envelope with its ``seq``.

        ``client_id`` is who sent it; None (the default) publishes as the server itself: the
        envelope's ``client_id`` is JSON ``null``, which no client id can be, so a client
        cannot pass itself off as the server (a POST handler, a job, a notification).

        Returns as soon as the backend has ordered the envelope and it is queued for every
        local member; it never waits for a recipient's socket. The envelope is encoded once,
        before the backend numbers it: what cannot be encoded raises
        `InvalidData` and takes no seq. Raises
        `InvalidInput` for a bad room, client id, type or data
        (nothing is published), and `BackendUnavailable` if
        the backend cannot be reached.
        """
        self._check_running()
        check_publication(room, client_id, type)
        return await self._publish(room, type, client_id, data)

    async def send_direct(self, to: str, data: JsonValue, client_id: str | None = None) -> Envelope:
        """Send ``data`` to every connection of client ``to``, on any node; return its envelope.

        The envelope has type ``direct`` and data ``{"to": to, "data": data}``, and is published
        in the personal stream `user_room` of ``to``: it reaches the
        connections that joined that stream, in order and resumable like a room's. Sent by a
        client (``client_id``, not ``to``), the same envelope (same ``id``) is published in the
        sender's personal stream too, so that the sender's other tabs show it; that copy is
        published second, and if the backend fails in between only the recipient has it.

        Nobody connected: it is kept in the stream's history (bounded and expiring like any
        room's) for the recipient's next resume, not refused. Raises what `broadcast`
        raises.
        """
        self._check_running()
        drafts = direct_drafts(to, data, client_id)
        envelopes = [await self.backend.publish_draft(draft) for draft in drafts]
        self._published += len(envelopes)
        return envelopes[0]

    async def _publish(
        self, room: str, type: str, client_id: str | None, data: JsonValue
    ) -> Envelope:
        envelope = await self.backend.publish_draft(Draft(type, room, client_id, data))
        self._published += 1
        return envelope

    async def presence(self, room: str) -> list[str]:
        """The client ids connected to ``room`` (on any node the backend spans), sorted."""
        check_name("room", room)
        return await self.backend.presence(room)

    def statistics(self) -> ManagerStatistics:
        """Current gauges and counters, for health checks and metrics."""
        delivered = self._delivered
        dropped = self._dropped
        slow = self._slow
        for connection in (*self._connections, *self._connecting):
            if connection.state is not ConnectionState.CLOSED:
                delivered += connection.queue.delivered
                dropped += connection.queue.dropped
                slow += connection.overflowed
        return ManagerStatistics(
            connections=len(self._connections) + len(self._connecting),
            rooms=len(self._rooms),
            published=self._published,
            delivered=delivered,
            dropped=dropped,
            slow_consumer_disconnects=slow,
            send_failures=self._send_failures,
            departures_lost=self._departures_lost,
            close_timeouts=self._close_timeouts,
        )

    def stats(self) -> ManagerStatistics:
        """Deprecated: use `statistics` (anyio's name for it)."""
        warn_renamed("ConnectionManager.stats()", "ConnectionManager.statistics()")
        return self.statistics()


__getattr__ = renamed_names(
    "wsbroadcast.manager", {"ManagerStats": ("wsbroadcast.manager", "ManagerStatistics")}
)
