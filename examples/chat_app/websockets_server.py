"""The chat app on the ``websockets`` library's asyncio server: wsbroadcast's fast path.

``python -m examples.chat_app --server websockets`` runs it. The routes, their checks and the
WebSocket protocol are `ChatService`'s, exactly as on
Starlette; this module only maps ``websockets``' requests and connections onto them. Plain
HTTP routes are answered from ``process_request``, before any WebSocket handshake.

The server runs with ``compression=None``: without permessage-deflate every connection takes
the same bytes for an envelope, so `WebsocketsTransport`
writes each envelope's frame, built once per publish, to all of them in one socket write per
batch. Compression would redo the work per connection (and make ``max_size`` apply after
decompression).

The edge is bounded as on uvicorn: ``open_timeout`` is the handshake deadline
(``--handshake-timeout``), ``websockets`` answers 414 and 431 to an oversized request line or
header block itself, and `BoundedServerConnection` closes a connection whose socket
write buffer (pongs included) passes ``--max-write-buffer`` with 4008.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import signal
import socket
import weakref
from http import HTTPStatus
from typing import ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from wsbroadcast import CloseCode
from wsbroadcast.transports.websockets import WebsocketsTransport

from .responses import CLIENT_JS_PATH, client_script
from .service import CLOSE_WAIT, ChatRequest, ChatService, FrameTooBig, Handshake, HttpResponse

__all__ = ["BoundedServerConnection", "WebsocketsFrontEnd", "run"]

logger = logging.getLogger("examples.chat_app")


class BoundedServerConnection(ServerConnection):
    """A ``websockets`` server connection whose outbound bytes are bounded.

    ``websockets`` answers every ping with a pong written to the socket whether or not the
    client reads, so a client that sends pings and never reads grows the server's memory
    without limit. After each read, if the socket's write buffer holds more than
    `max_write_buffer` bytes, the connection is closed as a slow consumer: a 4008 close
    frame, no more reading, and the TCP connection is dropped after `close_wait`
    seconds if it has not closed by then (the close frame waits behind what the client does
    not read).
    """

    max_write_buffer: ClassVar[int] = 4 * 1024 * 1024
    close_wait: ClassVar[float] = CLOSE_WAIT
    overflows: ClassVar[int] = 0
    """Connections closed for a full write buffer in this process, for ``/metrics``."""

    _overflowed = False

    def data_received(self, data: bytes) -> None:
        """``websockets``' own, then the write buffer's bound."""
        super().data_received(data)
        transport = self.transport
        if self._overflowed or transport.get_write_buffer_size() <= self.max_write_buffer:
            return
        self._overflowed = True
        BoundedServerConnection.overflows += 1
        logger.info(
            "%s - WebSocket closed with 4008: over %d bytes waiting to be written",
            self.remote_address,
            self.max_write_buffer,
        )
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(CloseCode.SLOW_CONSUMER, "slow consumer: write buffer full")
            self.send_data()
        transport.pause_reading()
        self.loop.call_later(self.close_wait, transport.abort)


class _WebsocketsSocket:
    """A ``websockets`` server connection as a `ChatSocket`."""

    gone: tuple[type[Exception], ...] = (OSError, ConnectionClosed)

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self.transport = WebsocketsTransport(connection, close_timeout=CLOSE_WAIT)

    async def receive(self) -> str | bytes | None:
        """The next text or binary frame, or None once the client has left."""
        try:
            return await self.connection.recv()
        except ConnectionClosed as exc:
            # max_size: websockets refused the frame and closed with 1009 itself.
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                raise FrameTooBig from None
            return None


def _response(response: HttpResponse) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(response.body))),
            ("Content-Type", response.content_type),
        ]
    )
    headers.update(response.headers)
    status = HTTPStatus(response.status)
    return Response(status.value, status.phrase, headers, response.body)


def _plain(status: HTTPStatus, text: str) -> Response:
    return _response(HttpResponse(status, "text/plain; charset=utf-8", text.encode()))


class WebsocketsFrontEnd:
    """The chat app's routes on ``websockets.asyncio.server.serve``, over one service.

    `process_request` answers the HTTP routes and checks WebSocket handshakes (a refusal
    is an HTTP 403, as on uvicorn); `handler` runs each accepted connection.
    """

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.client_js = client_script()
        self._accepted: weakref.WeakKeyDictionary[ServerConnection, ChatRequest] = (
            weakref.WeakKeyDictionary()
        )

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer ``GET /``, ``/wsbroadcast-client.js``, ``/healthz``, ``/metrics`` and
        ``/rooms/{room}``; refuse a bad ``/ws/{client_id}`` handshake with 403; None lets a
        good one proceed."""
        service = self.service
        # Older websockets parse GET requests only and have no Request.method.
        if getattr(request, "method", "GET") != "GET":
            response = _plain(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n")
            response.headers["Allow"] = "GET"
            return response
        url = urlsplit(request.path)
        path = url.path
        if path == "/":
            return _response(service.index())
        if path == CLIENT_JS_PATH:
            return _response(self.client_js)
        if path == "/healthz":
            return _response(service.healthz())
        if path == "/metrics":
            return _response(service.metrics())
        section, _, name = path[1:].partition("/")
        if not name or "/" in name or section not in ("rooms", "ws"):
            return _plain(HTTPStatus.NOT_FOUND, "Not Found\n")
        if section == "rooms":
            return _response(await service.room(unquote(name)))
        handshake = Handshake(
            path=path,
            client_id=unquote(name),
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            origin=request.headers.get("Origin"),
            host=request.headers.get("Host"),
            secure=connection.transport.get_extra_info("sslcontext") is not None,
            client_ip=_peer_ip(connection),
        )
        checked = service.check_handshake(handshake)
        if not isinstance(checked, ChatRequest):
            status = HTTPStatus(checked.status)
            return _plain(status, f"{status.phrase}: {checked.reason}\n")
        self._accepted[connection] = checked
        return None

    async def handler(self, connection: ServerConnection) -> None:
        """Run one accepted WebSocket with the service's protocol."""
        request = self._accepted.pop(connection)
        await self.service.serve(request, _WebsocketsSocket(connection))


def _peer_ip(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    return str(address[0]) if address else None


async def run(
    service: ChatService, host: str, port: int, listener: socket.socket | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; on ``listener`` if given (a
    worker's socket bound with SO_REUSEPORT, or one with a send buffer set), else on
    ``host:port``.

    Shutdown stops accepting, then leaves the manager, which closes every connection with
    1001 (Going Away) after announcing its ``leave``; then waits for the handlers to return,
    at most ``shutdown_timeout`` seconds (then the remaining connections are cut).
    """
    settings = service.settings
    connection_class = type(
        "BoundedServerConnection",
        (BoundedServerConnection,),
        {"max_write_buffer": settings.max_write_buffer},
    )
    service.write_buffer_overflows = lambda: BoundedServerConnection.overflows
    front = WebsocketsFrontEnd(service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with service.running():
        server = await serve(
            front.handler,
            None if listener else host,
            None if listener else port,
            sock=listener,
            process_request=front.process_request,
            compression=None,
            # websockets refuses oversized frames itself (close 1009) before buffering them.
            max_size=settings.max_message_bytes,
            close_timeout=CLOSE_WAIT,
            # The handshake's deadline: a client that dribbles its request is closed.
            open_timeout=settings.handshake_timeout,
            create_connection=connection_class,
        )
        try:
            await stop.wait()
        finally:
            server.close(close_connections=False)
    with anyio.move_on_after(settings.shutdown_timeout) as waiting:
        await server.wait_closed()
    if waiting.cancelled_caught:
        logger.warning("shutdown: connections still open after %ss, cut", settings.shutdown_timeout)
        for connection in server.connections:
            connection.transport.abort()
