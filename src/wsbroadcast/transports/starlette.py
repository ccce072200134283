"""Starlette (and FastAPI) WebSockets as wsbroadcast transports."""

from __future__ import annotations

import contextlib

from starlette.websockets import WebSocket, WebSocketState

__all__ = ["StarletteTransport"]


class StarletteTransport:
    """Wraps a Starlette ``WebSocket`` so that closing an already-closed socket is a no-op.

    A bare ``WebSocket`` works as a transport too; this adapter only spares the log a
    ``RuntimeError`` when the client left before the server closed, and skips ``accept`` if
    the application has accepted already (to send a subprotocol, say).
    """

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def accept(self) -> None:
        """Accept the handshake unless the application already did."""
        if self.websocket.application_state is WebSocketState.CONNECTING:
            await self.websocket.accept()

    async def send_text(self, data: str, /) -> None:
        """Send one text frame; raises if the client is gone."""
        await self.websocket.send({"type": "websocket.send", "text": data})

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame unless the socket is closed already."""
        websocket = self.websocket
        if (
            websocket.application_state is WebSocketState.DISCONNECTED
            or websocket.client_state is WebSocketState.DISCONNECTED
        ):
            return
        # RuntimeError: the client's disconnect raced with ours; the socket is closed either way.
        with contextlib.suppress(RuntimeError):
            await websocket.close(code, reason)
