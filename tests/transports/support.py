"""Servers and floods shared by the transport adapters' tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from wsbroadcast import CloseCode, Connection, ConnectionManager, ConnectionState
from wsbroadcast.transports.starlette import (
    StarletteTransport,
)
from wsbroadcast.transports.uvicorn import WebSocketProtocol


async def flood_until_closed(manager: ConnectionManager, closed: list[Connection]) -> None:
    """Broadcast 64 KiB frames until the stalled connection in ``closed`` has been closed."""
    big = "x" * 65536
    with anyio.fail_after(30):
        # Bounded: 2,000 frames of 64 KiB at most, on loopback.
        for _ in range(2000):
            await manager.broadcast("lobby", big, "writer")
            await anyio.lowlevel.checkpoint()
            if closed and closed[0].state is not ConnectionState.OPEN:
                break
        await closed[0].wait_closed()


def assert_join_then_300_broadcasts(received: list[Any]) -> None:
    """What a client of a 300-broadcast round got: its join, then every broadcast, whole."""
    assert received[0]["type"] == "join"
    assert [m["seq"] for m in received] == list(range(1, 302))
    assert [m["data"]["n"] for m in received[1:]] == list(range(300))
    assert received[-1]["data"]["pad"] == "é" * (299 * 7)


Endpoint = Callable[[WebSocket], Awaitable[None]]


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def uvicorn_server(
    endpoint: Endpoint,
    protocol: type[WebSocketProtocol],
    *,
    deflate: bool,
    http: type[asyncio.Protocol] | None = None,
    **options: Any,
) -> AsyncIterator[str]:
    """Serve ``endpoint`` at ``/`` with a real uvicorn on 127.0.0.1; yield its ws:// URL.

    ``/http`` answers a plain GET with ``ok``. ``http`` is uvicorn's HTTP protocol (its own
    httptools one if None); ``options`` go to ``uvicorn.Config``.
    """
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # clients may connect before uvicorn starts accepting
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/", endpoint), Route("/http", _ok)]),
        http=http or "auto",
        ws=protocol,
        ws_per_message_deflate=deflate,
        lifespan="off",
        log_level="warning",
        **options,
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [listener])
        try:
            yield f"ws://127.0.0.1:{port}/"
        finally:
            server.should_exit = True
    listener.close()


class RecordingProtocol(WebSocketProtocol):
    """uvicorn's side of each connection, recording when the TCP connection is gone."""

    lost: anyio.Event | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if RecordingProtocol.lost is not None:
            RecordingProtocol.lost.set()


class StalledProtocol(RecordingProtocol):
    """`RecordingProtocol` with a small, fixed kernel send buffer (see `STALLED_BUFFER`)."""

    def connection_made(self, transport: Any) -> None:
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, STALLED_BUFFER
        )
        super().connection_made(transport)


STALLED_BUFFER = 4096
"""Bytes asked of the kernel for the send buffer of the server's socket and the receive buffer
of a `stalled_client`'s (Linux doubles both). Fixed sizes turn autotuning off, so once
writing has paused (over 64 KiB in the asyncio buffer) the kernel takes at most 16 KiB more,
and the buffer cannot fall to the 16 KiB at which writing resumes: a close frame queued then
cannot get out, whatever the load on the machine."""


class FinishedProtocol(WebSocketProtocol):
    """uvicorn's side of each connection, recording in `done` when uvicorn is done with
    it: the application has returned and the TCP connection is gone."""

    done: anyio.Event | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport_lost = anyio.Event()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.transport_lost.set()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        await self.transport_lost.wait()
        assert FinishedProtocol.done is not None
        FinishedProtocol.done.set()


async def shed_a_stalled_client_on_uvicorn(
    make: Callable[[WebSocket], StarletteTransport],
) -> list[StarletteTransport]:
    """A client that stops reading after its join, flooded on uvicorn with wsbroadcast's
    protocol until the manager closes it with 4008; returns once its TCP connection is gone.
    """
    RecordingProtocol.lost = anyio.Event()
    transports: list[StarletteTransport] = []
    async with ConnectionManager(queue_size=8) as manager:
        closed: list[Connection] = []

        async def endpoint(websocket: WebSocket) -> None:
            transport = make(websocket)
            transports.append(transport)
            connection = await manager.connect(transport, "stalled")
            closed.append(connection)
            await connection.wait_closed()

        async with (
            uvicorn_server(endpoint, StalledProtocol, deflate=False) as url,
            stalled_client(url) as join,
        ):
            assert json.loads(join)["type"] == "join"
            await flood_until_closed(manager, closed)
            # The close frame could not get through the full buffer: the TCP connection was
            # dropped rather than kept until the client reads again.
            with anyio.fail_after(30):
                await RecordingProtocol.lost.wait()
            assert closed[0].close_code == CloseCode.SLOW_CONSUMER
            assert manager.statistics().slow_consumer_disconnects == 1
    return transports


@contextlib.asynccontextmanager
async def stalled_client(url: str) -> AsyncIterator[str]:
    """A WebSocket client of ``url`` that never reads its socket again once its first message
    is in; yields that message, and closes the socket on exit."""
    client = ClientProtocol(parse_uri(url))
    client.send_request(client.connect())
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_BUFFER)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port_of(url)))
        await loop.sock_sendall(sock, b"".join(client.data_to_send()))
        while True:
            # A byte at a time: nothing past the first message is taken off the socket.
            data = await loop.sock_recv(sock, 1)
            assert data, "the server closed before the first message"
            client.receive_data(data)
            frames = [e for e in client.events_received() if isinstance(e, Frame)]
            if frames:
                break
        assert frames[0].opcode is Opcode.TEXT
        yield bytes(frames[0].data).decode()


def port_of(url: str) -> int:
    """The port of a ``ws://127.0.0.1:PORT/`` URL."""
    return int(url.rsplit(":", 1)[1].strip("/"))


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a raw socket; return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # a timeout fails the test: the socket stayed open
            received += chunk
    return received


def upgrade_request(target: str, headers: str = "") -> bytes:
    """A WebSocket handshake request for ``target`` with extra ``headers`` (CRLF-ended)."""
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()
