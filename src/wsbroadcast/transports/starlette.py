"""Starlette (and FastAPI) WebSockets as wsbroadcast transports."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from starlette.websockets import WebSocket, WebSocketState

from ..outbound import frames_of
from ._once import log_once
from .base import FRAMES_EXTENSION, FramesExtension

if TYPE_CHECKING:
    from ..outbound import OutboundMessage

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "StarletteFramesTransport",
    "StarletteTransport",
    "starlette_transport",
]

logger = logging.getLogger("wsbroadcast.transports.starlette")

DEFAULT_CLOSE_TIMEOUT = 2.0
"""Seconds a close may take by default: a close frame queued behind a client that stopped
reading never gets out, so waiting without a bound would keep its socket forever."""


def starlette_transport(
    websocket: WebSocket, *, close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT
) -> StarletteTransport:
    """The best transport for ``websocket``: use this rather than a class.

    It is a `StarletteFramesTransport` (the fast path) when the server offers the
    `FramesExtension` for this connection, as
    `wsbroadcast.transports.uvicorn.WebSocketProtocol` does; otherwise a
    `StarletteTransport`, which sends through plain ASGI messages (said once in the
    log of ``wsbroadcast.transports.starlette``, at INFO, not once per connection).
    """
    extensions: Any = websocket.scope.get("extensions") or {}
    extension: FramesExtension | None = extensions.get(FRAMES_EXTENSION)
    if extension is not None:
        return StarletteFramesTransport(websocket, extension, close_timeout=close_timeout)
    log_once(
        logger,
        logging.INFO,
        "the ASGI server offers no wsbroadcast.frames extension (it is not"
        " wsbroadcast.transports.uvicorn.WebSocketProtocol, or the connection negotiated"
        " permessage-deflate): sending one websocket.send per frame, without the fast path",
    )
    return StarletteTransport(websocket, close_timeout=close_timeout)


class StarletteTransport:
    """Wraps a Starlette ``WebSocket`` so that closing an already-closed socket is a no-op.

    A bare ``WebSocket`` works as a transport too; this adapter only spares the log a
    ``RuntimeError`` when the client left before the server closed, and skips ``accept`` if
    the application has accepted already (to send a subprotocol, say).

    :param close_timeout: seconds ``close`` may take (default 2); None waits as long as the
        server does. The close frame queues behind everything buffered for the socket, so for
        a client that stopped reading (the one a slow-consumer close is for) it may never get
        out. When it times out, `close_timed_out` is set; plain ASGI has no way to drop
        the TCP connection, so the server keeps it until its own timeouts end it (the fast
        path, `StarletteFramesTransport`, drops it and sets `aborted`).
    """

    def __init__(
        self, websocket: WebSocket, *, close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT
    ) -> None:
        self.websocket = websocket
        self.close_timeout = close_timeout
        self.close_timed_out = False
        """True once a ``close`` took longer than ``close_timeout`` (the client stopped
        reading): an application counts these in its metrics."""
        self.aborted = False
        """True once the TCP connection was dropped because ``close`` timed out."""

    async def accept(self) -> None:
        """Accept the handshake unless the application already did."""
        if self.websocket.application_state is WebSocketState.CONNECTING:
            await self.websocket.accept()

    async def send_text(self, data: str, /) -> None:
        """Send one text frame; raises if the client is gone."""
        await self.websocket.send({"type": "websocket.send", "text": data})

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame unless the socket is closed already; see ``close_timeout``."""
        websocket = self.websocket
        if (
            websocket.application_state is WebSocketState.DISCONNECTED
            or websocket.client_state is WebSocketState.DISCONNECTED
        ):
            return
        with anyio.move_on_after(self.close_timeout) as scope:
            # RuntimeError: the client's disconnect raced with ours; it is closed either way.
            with contextlib.suppress(RuntimeError):
                await websocket.close(code, reason)
        if scope.cancelled_caught:
            self.close_timed_out = True
            self._close_timed_out()

    def _close_timed_out(self) -> None:
        """What to do when ``close`` took too long: nothing plain ASGI can do."""


class StarletteFramesTransport(StarletteTransport):
    """The fast path on an ASGI server that offers the ``wsbroadcast.frames`` extension.

    A `NowaitBatchTransport`: the manager's flusher hands it
    every message waiting for the connection and it writes their prepared bytes (each
    envelope's frame is built once per publish and shared by every recipient) in one socket
    write, without a task switch or an ASGI message per frame. When the socket is full, the
    connection's writer waits for it to drain. A ``close`` that times out drops the TCP
    connection, since its close frame would never get through. Build it with
    `starlette_transport`, which checks that the server offers the extension.
    """

    def __init__(
        self,
        websocket: WebSocket,
        extension: FramesExtension,
        *,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        super().__init__(websocket, close_timeout=close_timeout)
        self._write = extension["write"]
        self._drain = extension["drain"]
        self._abort = extension["abort"]

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        """Write the frames of `messages` in one socket write, first waiting for room if the
        socket is full."""
        data = frames_of(messages)
        while not self._write(data):
            await self._drain()

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        """Write the frames of `messages` in one socket write if the socket has room; else
        write nothing."""
        return self._write(frames_of(messages))

    def _close_timed_out(self) -> None:
        self._abort()
        self.aborted = True
