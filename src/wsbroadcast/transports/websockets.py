"""The ``websockets`` library's asyncio server connections as wsbroadcast transports."""

from __future__ import annotations

import contextlib

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

__all__ = ["WebsocketsTransport"]


class WebsocketsTransport:
    """Wraps a ``websockets.asyncio.server.ServerConnection``.

    ``websockets.serve`` has completed the handshake before the handler runs, so ``accept`` is
    a no-op. Runs on asyncio only, as the ``websockets`` library does.
    """

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection

    async def accept(self) -> None:
        """Nothing to do: the handshake is complete when the handler runs."""

    async def send_text(self, data: str, /) -> None:
        """Send one text frame; raises ``ConnectionClosed`` if the client is gone."""
        await self.connection.send(data, text=True)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Run the closing handshake (bounded by the connection's ``close_timeout``)."""
        with contextlib.suppress(ConnectionClosed):
            await self.connection.close(code, reason or "")
