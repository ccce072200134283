"""uvicorn's WebSocket protocol plus the ``wsbroadcast.frames`` ASGI extension (the fast path).

An ASGI application sends one frame per ``websocket.send`` message, and on uvicorn each one
is framed, joined and written to the socket on its own: for a broadcast to N clients that is
N times the server's per-frame work, whatever the application does. Serve with this protocol
and `starlette_transport` writes each envelope's
prepared frame (built once per publish) straight to every socket, a connection's waiting
frames in one write, through the `FramesExtension`::

    uvicorn app:app --ws wsbroadcast.transports.uvicorn:WebSocketProtocol \\
        --ws-per-message-deflate false

or ``uvicorn.run(app, ws=WebSocketProtocol, ws_per_message_deflate=False)``. Everything else
is uvicorn's ``websockets-sansio`` protocol, unchanged: the handshake, receiving, pings,
closing, and ``websocket.send`` for applications that do not use the extension.

The extension is offered only for connections that negotiated no WebSocket extension:
permessage-deflate compresses per connection, so with compression on (uvicorn's default)
clients that ask for it fall back to ``websocket.send``. The protocol relies on attributes of
uvicorn's ``WebSocketsSansIOProtocol`` (tested with uvicorn 0.54); if a uvicorn release
changes them, it stops offering the extension, and applications fall back to plain ASGI.

What it adds to uvicorn's protocol besides the extension:

- Bounded outbound bytes. A client that sends pings and never reads gets a pong per ping,
  written to a socket it does not drain: without a bound the server's memory grows with
  every ping. Whenever the socket's write buffer (``transport.get_write_buffer_size()``,
  pongs and every other frame included) passes `WebSocketProtocol.max_write_buffer`,
  the connection is closed as a slow consumer: a 4008 close frame, then the TCP connection
  is dropped if it has not closed within `WebSocketProtocol.close_wait` seconds.
  Reading stops at once, so no more pings are answered.
- Refusals that reach the client. A handshake that ``websockets`` refuses while parsing it
  (request line over 8 KiB: 414; a header line over 8 KiB or over 128 headers: 431) has its
  response written and the socket closed, where uvicorn's protocol logs it and leaves the
  socket open.
- A cheaper receive queue. uvicorn hands each received message to the application through an
  ``asyncio.Queue``, which looks up the running loop on every wait (on Python 3.11 a
  ``getpid`` system call per message) and takes about 3 KiB per connection; this
  protocol's is a list bound to the connection's loop.
- The handshake's request and response (their headers) are let go once the handshake is
  complete, where uvicorn keeps them for the connection's lifetime, and so is websockets'
  parser of the request, which holds it too (see `_restart_parser`): about 2.8 KiB per
  connection.
- A lighter ``writable`` flag: asyncio's ``Event`` carries a deque of about 700 bytes.
- One timer per event loop for every connection's keepalive ping (`_PingWheel`), instead
  of one per connection (about 540 bytes each); a ping goes out up to 0.1 s after it is due.
- An instance dict whose keys are shared with the other connections' (slots for 17 of
  uvicorn's attributes): 296 bytes, where uvicorn's protocol has one of 1.6 KiB each.
- A bounded shutdown. A connection whose 1012 close cannot get out (a stalled client) is
  dropped after ``close_wait``, so it does not hold up the server's exit.

`WebSocketProtocol.configure` makes a subclass with other limits. For the HTTP side of
the handshake (a deadline for the request head, limits on its size), serve with
`wsbroadcast.transports.uvicorn_http.HttpToolsProtocol`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from typing import Any, ClassVar, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from ..control import CloseCode
from ._once import log_once
from .base import FRAMES_EXTENSION, FramesExtension

__all__ = ["WebSocketProtocol"]

logger = logging.getLogger("wsbroadcast.transports.uvicorn")

_RELIED_ON = ("conn", "scope", "transport", "writable")


class _Inbox:
    """What uvicorn's protocol calls its ``queue``: ASGI events on their way to the
    application, first in, first out, unbounded as uvicorn's is (its protocol stops reading
    while an event waits).

    uvicorn uses an ``asyncio.Queue``: three deques and an event, about 3 KiB per connection,
    and a lookup of the running loop on every wait (a system call on Python 3.11). This is a
    list and one future per waiting getter, bound to the connection's loop.
    """

    __slots__ = ("_events", "_head", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._events: list[Any] = []
        self._head = 0
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return self._head == len(self._events)

    def qsize(self) -> int:
        return len(self._events) - self._head

    def put_nowait(self, event: Any) -> None:
        self._events.append(event)
        self._wake_one()

    async def get(self) -> Any:
        while self._head == len(self._events):
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not self.empty():
                    self._wake_one()  # woken, then cancelled: pass the wake-up on
                raise
        events, head = self._events, self._head
        event = events[head]
        if head + 1 == len(events):
            events.clear()
            self._head = 0
        else:
            events[head] = None
            self._head = head + 1
        return event

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return


class _Writable:
    """What uvicorn's protocol calls ``writable``: the four methods of an ``asyncio.Event``
    it uses, set at first, with its waiters in a list made on demand (an ``Event`` holds a
    deque of about 700 bytes from the start)."""

    __slots__ = ("_flag", "_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flag = True
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> bool:
        if self._flag:
            return True
        waiter = self._loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            # set() drops the whole list; a waiter cancelled before that takes itself out.
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


_FRAME_PARSER = Protocol.parse.__code__
_AT_EOF = StreamReader.at_eof.__code__


def _restart_parser(conn: ServerProtocol) -> bool:
    """Replace an open connection's parser by a fresh frame parser, if it waits at a frame
    boundary; return whether it did.

    ``websockets`` parses a server connection's input with one generator that reads the
    handshake request, then runs the frame parser (`Protocol.parse`) inside it: the request,
    its headers and both generators' frames stay alive as long as the connection, about
    2.8 KiB. Between frames the frame parser waits in `StreamReader.at_eof` with nothing
    buffered, and everything else it keeps is on the connection (``current_size``, the
    reader), so a new frame parser started there is in the same state. A parser anywhere
    else (a frame half-received, a closed or failed connection, a ``websockets`` release that
    parses otherwise) is left as it is.
    """
    outer = conn.parser
    inner = getattr(outer, "gi_yieldfrom", None)
    waiting = getattr(inner, "gi_yieldfrom", None)
    if (
        conn.state is not State.OPEN
        or conn.reader.buffer
        or getattr(inner, "gi_code", None) is not _FRAME_PARSER
        or getattr(waiting, "gi_code", None) is not _AT_EOF
    ):
        return False
    parser = Protocol.parse(conn)
    next(parser)  # runs to at_eof's yield: the reader is empty
    conn.parser = parser
    outer.close()
    return True


class _PingWheel:
    """The keepalive pings of every connection on one event loop, behind one timer.

    uvicorn gives each connection a timer for its next ping (``loop.call_later``): on
    uvloop about 540 bytes each (the handle, libuv's timer, a copy of the context, the
    bound method). Here a connection waits in a bucket, a dict entry, of the tick it is due
    in; ticks are `resolution` seconds, so a ping goes out up to that much later than due.
    """

    resolution: ClassVar[float] = 0.1

    __slots__ = ("_armed", "_buckets", "_loop", "_ticks", "_timer")

    _wheels: ClassVar[dict[asyncio.AbstractEventLoop, _PingWheel]] = {}

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _PingWheel:
        """The wheel of ``loop``, made on demand; it is dropped when it has no connection."""
        wheel = cls._wheels.get(loop)
        if wheel is None:
            wheel = cls._wheels[loop] = cls(loop)
        return wheel

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, dict[WebSocketProtocol, None]] = {}
        self._ticks: list[int] = []
        """A heap of the buckets' ticks; a tick whose bucket emptied stays until popped."""
        self._timer: asyncio.TimerHandle | None = None
        self._armed: int | None = None

    def add(self, protocol: WebSocketProtocol, delay: float) -> int:
        """Ping ``protocol`` (`send_keepalive_ping`) in ``delay`` seconds; return the tick
        to `remove` it with."""
        tick = math.ceil((self._loop.time() + delay) / self.resolution)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
            if self._armed is None or tick < self._armed:
                self._arm(tick)
        bucket[protocol] = None
        return tick

    def remove(self, protocol: WebSocketProtocol, tick: int) -> None:
        """Do not ping ``protocol`` at ``tick`` after all."""
        bucket = self._buckets.get(tick)
        if bucket is None or protocol not in bucket:
            return
        del bucket[protocol]
        if not bucket:
            del self._buckets[tick]
            if not self._buckets:
                self._close()

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = tick
        self._timer = self._loop.call_at(tick * self.resolution, self._fire)

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._armed = None
        if self._wheels.get(self._loop) is self:
            del self._wheels[self._loop]

    def _fire(self) -> None:
        armed = self._armed
        assert armed is not None
        self._timer = self._armed = None
        # The loop may call a timer a clock resolution early: the armed tick is due anyway.
        now = max(armed, math.floor(self._loop.time() / self.resolution))
        due: list[WebSocketProtocol] = []
        while self._ticks and self._ticks[0] <= now:
            due.extend(self._buckets.pop(heapq.heappop(self._ticks), ()))
        while self._ticks and self._ticks[0] not in self._buckets:
            heapq.heappop(self._ticks)
        if self._ticks:
            self._arm(self._ticks[0])
        else:  # every bucket has its tick in the heap: none is left either
            self._close()
        for protocol in due:
            protocol._ping_tick = None
        for protocol in due:
            try:
                protocol.send_keepalive_ping()
            except Exception as exc:  # one connection's failure is not the others'
                self._loop.call_exception_handler(
                    {"message": "WebSocket keepalive ping failed", "exception": exc}
                )


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` WebSocket protocol offering ``wsbroadcast.frames``,
    with outbound bytes bounded per connection (see the module's documentation)."""

    # uvicorn's protocol sets 37 attributes; CPython shares an instance dict's keys among a
    # class's instances up to 30, past which each connection had a whole table (1.6 KiB).
    # These live in slots, so the rest share theirs.
    __slots__ = (
        "_ping_tick",
        "app",
        "app_state",
        "asgi_version",
        "config",
        "connections",
        "default_headers",
        "last_ping_rtt",
        "logger",
        "loop",
        "pending_ping_payload",
        "ping_interval",
        "ping_sent_at",
        "ping_timeout",
        "ping_timer",
        "pong_timer",
        "root_path",
        "tasks",
    )

    max_write_buffer: ClassVar[int] = 4 * 1024 * 1024
    """Bytes the socket's write buffer may hold before the connection is closed with 4008."""
    close_wait: ClassVar[float] = 2.0
    """Seconds a close frame that cannot get out (slow consumer, shutdown) is given before
    the TCP connection is dropped."""
    offer_frames: ClassVar[bool] = True
    """Whether to offer the extension; false keeps the protections only, with plain ASGI
    sends (to compare the two, say)."""
    slow_consumers: ClassVar[int] = 0
    """Connections closed because their write buffer passed `max_write_buffer`, in this
    process (on this class and its subclasses), for metrics."""

    _compatible: ClassVar[bool | None] = None

    @classmethod
    def configure(
        cls,
        *,
        max_write_buffer: int | None = None,
        close_wait: float | None = None,
        offer_frames: bool | None = None,
    ) -> type[WebSocketProtocol]:
        """A subclass with other limits (None keeps one), to pass as uvicorn's ``ws``."""
        options: dict[str, Any] = {}
        if offer_frames is not None:
            options["offer_frames"] = offer_frames
        if max_write_buffer is not None:
            if max_write_buffer < 1:
                raise ValueError(f"max_write_buffer must be positive, not {max_write_buffer}")
            options["max_write_buffer"] = max_write_buffer
        if close_wait is not None:
            if not close_wait > 0:
                raise ValueError(f"close_wait must be positive, not {close_wait}")
            options["close_wait"] = close_wait
        return type(cls.__name__, (cls,), options)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = cast("asyncio.Queue[Any]", _Inbox(self.loop))
        self.writable = cast("asyncio.Event", _Writable(self.loop))
        self._ping_tick: int | None = None

    async def run_asgi(self) -> None:
        """Add the extension to the connection's scope, then run the application."""
        if not self.offer_frames:
            pass
        elif self.conn.extensions:
            log_once(
                logger,
                logging.INFO,
                "a connection negotiated permessage-deflate: no wsbroadcast.frames fast path"
                " for such connections (serve with ws_per_message_deflate=False to keep it)",
            )
        elif self._check_compatible():
            extension: FramesExtension = {
                "write": self._write_frames,
                "drain": self._drain_frames,
                "abort": self._abort,
            }
            self.scope["extensions"][FRAMES_EXTENSION] = cast("dict[object, object]", extension)
        else:
            log_once(
                logger,
                logging.WARNING,
                "this uvicorn's websockets-sansio protocol lacks what"
                f" wsbroadcast.transports.uvicorn relies on ({', '.join(_RELIED_ON)}):"
                " no wsbroadcast.frames fast path",
            )
        try:
            await super().run_asgi()
        finally:
            # The extension's bound methods, held by this protocol's scope, make a reference
            # cycle: without it a closed connection is freed by reference counting.
            extensions = self.scope.get("extensions")
            if isinstance(extensions, dict):
                extensions.pop(FRAMES_EXTENSION, None)

    def _check_compatible(self) -> bool:
        cls = type(self)
        if cls._compatible is None:
            cls._compatible = all(hasattr(self, name) for name in _RELIED_ON) and isinstance(
                self.scope.get("extensions"), dict
            )
        return cls._compatible

    def data_received(self, data: bytes) -> None:
        """uvicorn's, plus: write a refused handshake's response; bound the write buffer."""
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets refused the request while parsing it (414, 431) and queued its
            # response, which uvicorn's protocol never writes: write it and close.
            self.logger.info(
                "WebSocket handshake refused: %s", self.conn.handshake_exc or "invalid request"
            )
            self.handshake_initiated = self.handshake_complete = self.close_sent = True
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return
        self._check_write_buffer()

    async def send(self, message: Any) -> None:
        """uvicorn's; a handshake answered with an HTTP response (``websocket.http.response``,
        a denial) counts as complete, so that uvicorn does not log an error for it. Once the
        handshake is complete, its request and response are let go, and so is the parser
        that read the request (`_restart_parser`)."""
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True
        if self.handshake_complete and self.request is not None:
            # uvicorn needs them only to answer the handshake; an idle connection kept both.
            self.request = self.response = None  # type: ignore[assignment]
            _restart_parser(self.conn)

    def schedule_ping(self) -> None:
        """uvicorn's: the next keepalive ping, in the loop's `_PingWheel` instead of a timer of
        its own."""
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        wheel = _PingWheel.of(self.loop)
        if self._ping_tick is not None:
            wheel.remove(self, self._ping_tick)
        self._ping_tick = wheel.add(self, delay)

    def stop_keepalive(self) -> None:
        """uvicorn's, and out of the `_PingWheel`."""
        wheel = _PingWheel._wheels.get(self.loop)
        if self._ping_tick is not None and wheel is not None:
            wheel.remove(self, self._ping_tick)
        self._ping_tick = None
        super().stop_keepalive()

    def shutdown(self) -> None:
        """uvicorn's (a 1012 close), and drop the connection if it has not closed in time."""
        super().shutdown()
        self._abort_later()

    def _check_write_buffer(self) -> None:
        """Close as a slow consumer once the write buffer passes `max_write_buffer`."""
        transport = self.transport
        if transport.get_write_buffer_size() <= self.max_write_buffer or transport.is_closing():
            return
        WebSocketProtocol.slow_consumers += 1  # on the base class, which subclasses share
        reason = "slow consumer: write buffer full"
        self.logger.info(
            "%s - WebSocket closed with 4008: over %d bytes waiting to be written",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            self.max_write_buffer,
        )
        if self.conn.state is State.OPEN:
            self.conn.send_close(CloseCode.SLOW_CONSUMER, reason)
            transport.write(b"".join(self.conn.data_to_send()))
        if not self.close_sent:
            self.close_sent = True
            self.queue.put_nowait(
                {"type": "websocket.disconnect", "code": CloseCode.SLOW_CONSUMER, "reason": reason}
            )
        transport.close()  # stops reading now; the socket closes once the buffer is flushed
        self._abort_later()

    def _abort_later(self) -> None:
        """Drop the TCP connection after `close_wait` unless it closed by then."""
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_wait, self.transport.abort)

    def _check_open(self) -> None:
        # OPEN once the app accepted; not after a close frame either way (uvicorn sends and
        # receives them through self.conn). A lost or aborted connection's transport is closing.
        if self.conn.state is not State.OPEN or self.transport.is_closing():
            raise ConnectionError("the WebSocket connection is not open")

    def _write_frames(self, data: bytes) -> bool:
        self._check_open()
        if not self.writable.is_set():
            return False
        self.transport.write(data)
        self._check_write_buffer()
        return True

    async def _drain_frames(self) -> None:
        await self.writable.wait()
        self._check_open()

    def _abort(self) -> None:
        self.transport.abort()
