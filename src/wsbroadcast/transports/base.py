"""The transport interface: the one socket the library writes to.

A transport is what the original design draws as a WebSocket: `accept()`, `send_text(str)`
and `close(code, reason)`. Starlette's `WebSocket` fits as it is; adapters for other
servers live in `wsbroadcast.transports`. Receiving stays with the application: the
library only ever writes, and never two sends at once on one connection. Which task writes
depends on what the transport can do, decided once when the connection is made: a
`NowaitBatchTransport` is written by the manager's one flusher task, and by a writer task of
its own connection only while its socket is full; any other transport has a writer task for
as long as its connection is open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:
    from ..outbound import OutboundMessage

__all__ = [
    "FRAMES_EXTENSION",
    "BatchTransport",
    "FramesExtension",
    "NowaitBatchTransport",
    "Transport",
]


@runtime_checkable
class Transport(Protocol):
    """What `ConnectionManager` needs from a WebSocket.

    ``send_text`` may block while the peer is slow (that is how back-pressure reaches the
    connection's queue) and may raise once the peer is gone: either way only that connection
    is affected. ``close`` is called at most once by the manager and should not raise on a
    socket that is already closed; if it does, the manager ignores the error.
    """

    async def accept(self) -> None:
        """Complete the opening handshake (a no-op for servers that have already done it)."""
        ...

    async def send_text(self, data: str, /) -> None:
        """Send one text frame."""
        ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Start the closing handshake with ``code`` and ``reason``."""
        ...


@runtime_checkable
class BatchTransport(Transport, Protocol):
    """A transport that can write several frames at once: the fast path.

    When a transport has `send_batch`, the connection's writer hands it every message that
    is waiting, in order, instead of calling `send_text` once per message. Each is an
    `OutboundMessage`: an `Envelope` (whose `frame` is the WebSocket frame built once per
    publish, shared by every recipient) or a `ControlMessage` (an error, a `history_lost`...);
    both have `text` and `frame`. An implementation writes their frames in one go when it
    can (`wsbroadcast.outbound.frames_of`), and must fall back to sending each `text` when
    its connection negotiated an extension such as permessage-deflate, which makes frames
    differ per connection.
    """

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        """Send `messages` in order, as text frames; raise if the peer is gone."""
        ...


@runtime_checkable
class NowaitBatchTransport(BatchTransport, Protocol):
    """A batch transport that can also write without waiting, when its socket has room.

    For such transports the manager does not wake a writer task per connection per
    publish: one flusher task writes, once per burst, every connection's waiting messages
    with `send_batch_nowait`. Only a connection whose socket is full falls back to a writer
    task of its own, which waits with `send_batch`.
    """

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        """Write all of `messages` now and return true, or write nothing and return false.

        Return false when the socket's buffer is above its limit (or the connection uses an
        extension that prevents raw writes); raise if the peer is gone.
        """
        ...


FRAMES_EXTENSION = "wsbroadcast.frames"
"""The key of `FramesExtension` in an ASGI WebSocket scope's ``extensions``."""


class FramesExtension(TypedDict):
    """An ASGI extension that lets an application write prepared frames to its socket.

    ASGI has one ``websocket.send`` per frame and no way to send without waiting, so an ASGI
    application pays the server's per-frame work once per recipient, however well it
    batches. A server that offers this extension in ``scope["extensions"]["wsbroadcast.frames"]``
    takes pre-built, unmasked server frames (`wsbroadcast.frames.text_frame`), several
    at a time, in one socket write. A server offers it only for a connection that negotiated
    no WebSocket extension (such as permessage-deflate, which makes frames differ per
    connection). `wsbroadcast.transports.uvicorn.WebSocketProtocol` offers it on
    uvicorn; `wsbroadcast.transports.starlette.starlette_transport` uses it when offered.

    ``write`` and ``drain`` raise `ConnectionError` when the connection is not open:
    before the application accepted it, after a close frame was sent or received, or once it
    is lost; ``abort`` on a connection that is gone does nothing.
    Frames written with it and ``websocket.send`` messages go out in the order they are made.
    """

    write: Callable[[bytes], bool]
    """Write ``data`` (whole frames) now and return true; or, when the socket's write buffer
    is above its high-water mark, write nothing and return false."""
    drain: Callable[[], Awaitable[None]]
    """Wait until the socket's write buffer is below its low-water mark."""
    abort: Callable[[], None]
    """Drop the TCP connection at once, discarding what is buffered (for a peer that stopped
    reading, whose close frame would never get through)."""
