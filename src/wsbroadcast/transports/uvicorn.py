"""uvicorn's WebSocket protocol plus the ``wsbroadcast.frames`` ASGI extension (the fast path).

An ASGI application sends one frame per ``websocket.send`` message, and on uvicorn each one
is framed, joined and written to the socket on its own: for a broadcast to N clients that is
N times the server's per-frame work, whatever the application does. Serve with this protocol
and :func:`~wsbroadcast.transports.starlette.starlette_transport` writes each envelope's
prepared frame (built once per publish) straight to every socket, a connection's waiting
frames in one write, through the :class:`~wsbroadcast.transport.FramesExtension`::

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
"""

from __future__ import annotations

from typing import ClassVar, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from ..transport import FRAMES_EXTENSION, FramesExtension

__all__ = ["WebSocketProtocol"]

_RELIED_ON = ("conn", "scope", "transport", "writable")


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` WebSocket protocol offering ``wsbroadcast.frames``."""

    _compatible: ClassVar[bool | None] = None

    async def run_asgi(self) -> None:
        """Add the extension to the connection's scope, then run the application."""
        if not self.conn.extensions and self._check_compatible():
            extension: FramesExtension = {
                "write": self._write_frames,
                "drain": self._drain_frames,
                "abort": self._abort,
            }
            self.scope["extensions"][FRAMES_EXTENSION] = cast("dict[object, object]", extension)
        await super().run_asgi()

    def _check_compatible(self) -> bool:
        cls = type(self)
        if cls._compatible is None:
            cls._compatible = all(hasattr(self, name) for name in _RELIED_ON) and isinstance(
                self.scope.get("extensions"), dict
            )
        return cls._compatible

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
        return True

    async def _drain_frames(self) -> None:
        await self.writable.wait()
        self._check_open()

    def _abort(self) -> None:
        self.transport.abort()
