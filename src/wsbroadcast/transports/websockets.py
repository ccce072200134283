"""The ``websockets`` library's asyncio server connections as wsbroadcast transports."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import anyio
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ..outbound import OutboundMessage, frames_of
from ._once import log_once

__all__ = ["WebsocketsTransport"]

logger = logging.getLogger("wsbroadcast.transports.websockets")


class WebsocketsTransport:
    """Wraps a ``websockets.asyncio.server.ServerConnection``; the library's fast path.

    It is a `NowaitBatchTransport`: while the socket has room,
    the manager's flusher hands it every waiting message at once, with no task switch per
    connection; when the connection negotiated no extension it writes each envelope's
    prepared frame (built once per publish, shared by every recipient) in a single write to
    the socket. When the socket is full, the connection's writer waits for it to drain.
    With permessage-deflate negotiated, frames differ per connection, so it sends them one by
    one through ``websockets``. Serve with ``compression=None`` to get the fast path.

    ``websockets.serve`` has completed the handshake before the handler runs, so ``accept`` is
    a no-op. Runs on asyncio only, as the ``websockets`` library does.

    :param close_timeout: seconds ``close`` may take before the TCP connection is dropped.
        A client that stopped reading (the one a slow-consumer close is for) never drains its
        buffer, so the close frame could wait behind it until keepalive gave up. Such a close
        sets `close_timed_out` and `aborted`, for the application's metrics.
    """

    def __init__(self, connection: ServerConnection, *, close_timeout: float = 2.0) -> None:
        self.connection = connection
        self.close_timeout = close_timeout
        self.close_timed_out = False
        """True once a ``close`` took longer than ``close_timeout``."""
        self.aborted = False
        """True once the TCP connection was dropped because ``close`` timed out."""
        if connection.protocol.extensions:
            log_once(
                logger,
                logging.INFO,
                "a connection negotiated a WebSocket extension (permessage-deflate): its"
                " frames are encoded per connection, without the fast path (serve with"
                " compression=None to keep it)",
            )

    async def accept(self) -> None:
        """Nothing to do: the handshake is complete when the handler runs."""

    async def send_text(self, data: str, /) -> None:
        """Send one text frame; raises ``ConnectionClosed`` if the client is gone."""
        await self.connection.send(data, text=True)

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        """Send `messages` in order, in one socket write when no extension is in use."""
        connection = self.connection
        if connection.protocol.extensions:
            for message in messages:
                await connection.send(message.text, text=True)
            return
        self._write(messages)
        await connection.drain()

    def send_batch_nowait(self, messages: Sequence[OutboundMessage], /) -> bool:
        """Write `messages` in one socket write if the socket has room; else write nothing."""
        connection = self.connection
        if connection.protocol.extensions or connection.paused:
            return False
        self._write(messages)
        return True

    def _write(self, messages: Sequence[OutboundMessage]) -> None:
        connection = self.connection
        transport = connection.transport
        if connection.protocol.state is not State.OPEN or transport.is_closing():
            raise ConnectionError("the WebSocket connection is not open")
        transport.write(frames_of(messages))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Run the closing handshake; drop the connection if it takes over ``close_timeout``."""
        with anyio.move_on_after(self.close_timeout) as scope:
            with contextlib.suppress(ConnectionClosed):
                await self.connection.close(code, reason or "")
        if scope.cancelled_caught:
            self.close_timed_out = self.aborted = True
            self.connection.transport.abort()
