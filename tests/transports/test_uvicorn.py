"""The transport adapters against real servers over loopback."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from wsbroadcast import CloseCode, Connection, ConnectionManager, ConnectionState, Transport
from wsbroadcast.testing import MemoryTransport
from wsbroadcast.transport import BatchTransport, NowaitBatchTransport
from wsbroadcast.transports import _once
from wsbroadcast.transports.starlette import (
    DEFAULT_CLOSE_TIMEOUT,
    StarletteFramesTransport,
    StarletteTransport,
    starlette_transport,
)
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.websockets import WebsocketsTransport


def test_transports_satisfy_the_protocol() -> None:
    assert isinstance(MemoryTransport(), Transport)
    assert issubclass(StarletteTransport, Transport)
    assert issubclass(WebsocketsTransport, BatchTransport)
    assert issubclass(StarletteFramesTransport, NowaitBatchTransport)
    assert not issubclass(StarletteTransport, BatchTransport)
    assert issubclass(WebSocket, Transport)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_websockets_adapter_broadcasts_and_survives_a_vanished_client() -> None:
    async with ConnectionManager() as manager:

        async def handler(websocket: ServerConnection) -> None:
            client_id = websocket.request.path.rsplit("/", 1)[-1] if websocket.request else "x"
            connection = await manager.connect(WebsocketsTransport(websocket), client_id)
            try:
                async for text in websocket:
                    await manager.broadcast("lobby", {"message": text}, client_id)
            finally:
                await manager.disconnect(connection)

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url = f"ws://127.0.0.1:{port}/ws"
            async with connect(f"{url}/alice") as alice:
                assert json.loads(await alice.recv())["type"] == "join"
                async with connect(f"{url}/bob") as bob:
                    assert json.loads(await bob.recv())["client_id"] == "bob"
                    assert json.loads(await alice.recv())["client_id"] == "bob"
                    await bob.send("hi")
                    for client in (alice, bob):
                        envelope = json.loads(await client.recv())
                        assert (envelope["seq"], envelope["data"]) == (3, {"message": "hi"})
                    bob.transport.abort()
                leave = json.loads(await alice.recv())
                assert (leave["type"], leave["client_id"]) == ("leave", "bob")
                assert await manager.presence("lobby") == ["alice"]


def test_starlette_adapter_accepts_once_and_closes_tolerantly() -> None:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="chat")
        transport = starlette_transport(websocket)
        assert type(transport) is StarletteTransport  # the test client offers no extension
        await transport.accept()  # already accepted: a no-op
        await transport.send_text("one")
        await transport.close(CloseCode.GOING_AWAY, "bye")
        await transport.close(CloseCode.GOING_AWAY, "again")  # closed already: a no-op

    app = Starlette(routes=[WebSocketRoute("/", endpoint)])
    with TestClient(app) as client, client.websocket_connect("/", subprotocols=["chat"]) as ws:
        assert ws.accepted_subprotocol == "chat"
        assert ws.receive_text() == "one"
        message = ws.receive()
        assert message == {"type": "websocket.close", "code": 1001, "reason": "bye"}


async def _fast_path_round(compression: str | None) -> tuple[list[Any], list[bool]]:
    """Serve with or without permessage-deflate; return what a client got and the modes used."""
    used_raw_writes: list[bool] = []
    received: list[Any] = []
    async with ConnectionManager(queue_size=4096) as manager:

        async def handler(websocket: ServerConnection) -> None:
            used_raw_writes.append(not websocket.protocol.extensions)
            connection = await manager.connect(WebsocketsTransport(websocket), "reader")
            await websocket.wait_closed()
            await manager.disconnect(connection)

        async with serve(handler, "127.0.0.1", 0, compression=compression) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", compression="deflate") as client:
                received.append(json.loads(await client.recv()))
                for n in range(300):
                    await manager.broadcast("lobby", {"n": n, "pad": "é" * (n * 7)}, "writer")
                for _ in range(300):
                    received.append(json.loads(await client.recv()))
    return received, used_raw_writes


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_websockets_batches_prepared_frames_or_falls_back_per_connection(
    compression: str | None,
) -> None:
    received, raw = await _fast_path_round(compression)
    assert raw == [compression is None]
    assert received[0]["type"] == "join"
    assert [m["seq"] for m in received] == list(range(1, 302))
    assert [m["data"]["n"] for m in received[1:]] == list(range(300))
    assert received[-1]["data"]["pad"] == "é" * (299 * 7)


async def _flood_until_closed(manager: ConnectionManager, closed: list[Connection]) -> None:
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


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_stops_reading_is_shed_on_the_fast_path() -> None:
    async with ConnectionManager(queue_size=8) as manager:
        closed: list[Connection] = []

        async def handler(websocket: ServerConnection) -> None:
            transport = WebsocketsTransport(websocket, close_timeout=0.5)
            connection = await manager.connect(transport, "stalled")
            closed.append(connection)
            await connection.wait_closed()

        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            # max_queue=1: the client library stops reading the socket after one message.
            async with connect(
                f"ws://127.0.0.1:{port}/", max_queue=1, compression=None, close_timeout=1
            ) as c:
                assert json.loads(await c.recv())["type"] == "join"
                await _flood_until_closed(manager, closed)
                assert closed[0].close_code == CloseCode.SLOW_CONSUMER
                # The close frame could not get through the full buffer: the TCP connection
                # was dropped instead of waiting for keepalive to give up.
                stalled_transport = closed[0].transport
                assert isinstance(stalled_transport, WebsocketsTransport)
                assert stalled_transport.connection.transport.is_closing()
                assert manager.stats().slow_consumer_disconnects == 1


Endpoint = Callable[[WebSocket], Awaitable[None]]


@contextlib.asynccontextmanager
async def _uvicorn(
    endpoint: Endpoint, protocol: type[WebSocketProtocol], *, deflate: bool
) -> AsyncIterator[str]:
    """Serve ``endpoint`` at ``/`` with a real uvicorn on 127.0.0.1; yield its ws:// URL."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # clients may connect before uvicorn starts accepting
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        Starlette(routes=[WebSocketRoute("/", endpoint)]),
        ws=protocol,
        ws_per_message_deflate=deflate,
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [listener])
        try:
            yield f"ws://127.0.0.1:{port}/"
        finally:
            server.should_exit = True
    listener.close()


async def _uvicorn_round(
    protocol: type[WebSocketProtocol], *, deflate: bool
) -> tuple[list[Any], list[type[StarletteTransport]]]:
    """Broadcast 300 frames to one client of uvicorn; return what it got and the transport."""
    transports: list[type[StarletteTransport]] = []
    received: list[Any] = []
    async with ConnectionManager(queue_size=4096) as manager:

        async def endpoint(websocket: WebSocket) -> None:
            transport = starlette_transport(websocket)
            transports.append(type(transport))
            connection = await manager.connect(transport, "reader")
            with connection.cancel_on_close():
                await websocket.receive()  # the client's close
            await manager.disconnect(connection)

        async with (
            _uvicorn(endpoint, protocol, deflate=deflate) as url,
            connect(url, compression="deflate") as client,
        ):
            received.append(json.loads(await client.recv()))
            for n in range(300):
                await manager.broadcast("lobby", {"n": n, "pad": "é" * (n * 7)}, "writer")
            for _ in range(300):
                received.append(json.loads(await client.recv()))
            await client.send(json.dumps(received[-1]))  # writing after raw frames is fine
    return received, transports


class _WithoutWritable(WebSocketProtocol):
    """A protocol as if a uvicorn release had renamed an attribute the extension needs."""

    _compatible = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.writable

    async def send(self, message: Any) -> None:
        self.writable = anyio.Event()
        self.writable.set()
        await super().send(message)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("protocol", "deflate", "fast"),
    [
        (WebSocketProtocol, False, True),
        (WebSocketProtocol, True, False),  # the client asks for deflate and gets it
        (_WithoutWritable, False, False),
    ],
    ids=["frames", "deflate-negotiated", "incompatible-uvicorn"],
)
async def test_uvicorn_protocol_offers_raw_frames_only_where_they_are_right(
    protocol: type[WebSocketProtocol], deflate: bool, fast: bool
) -> None:
    received, transports = await _uvicorn_round(protocol, deflate=deflate)
    assert transports == [StarletteFramesTransport if fast else StarletteTransport]
    assert received[0]["type"] == "join"
    assert [m["seq"] for m in received] == list(range(1, 302))
    assert [m["data"]["n"] for m in received[1:]] == list(range(300))
    assert received[-1]["data"]["pad"] == "é" * (299 * 7)


class _Recording(WebSocketProtocol):
    """uvicorn's side of each connection, recording when the TCP connection is gone."""

    lost: anyio.Event | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if _Recording.lost is not None:
            _Recording.lost.set()


async def _shed_a_stalled_client_on_uvicorn(
    make: Callable[[WebSocket], StarletteTransport],
) -> list[StarletteTransport]:
    """A client that stops reading after its join, flooded on uvicorn with wsbroadcast's
    protocol until the manager closes it with 4008; returns once its TCP connection is gone.
    """
    _Recording.lost = anyio.Event()
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
            _uvicorn(endpoint, _Recording, deflate=False) as url,
            # max_queue=1: the client library stops reading the socket after one message.
            connect(url, max_queue=1, compression=None, close_timeout=1) as c,
        ):
            assert json.loads(await c.recv())["type"] == "join"
            await _flood_until_closed(manager, closed)
            # The close frame could not get through the full buffer: the TCP connection was
            # dropped rather than kept until the client reads again.
            with anyio.fail_after(30):
                await _Recording.lost.wait()
            assert closed[0].close_code == CloseCode.SLOW_CONSUMER
            assert manager.stats().slow_consumer_disconnects == 1
    return transports


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_stops_reading_is_shed_and_dropped_on_uvicorn() -> None:
    [transport] = await _shed_a_stalled_client_on_uvicorn(
        lambda websocket: starlette_transport(websocket, close_timeout=0.5)
    )
    assert isinstance(transport, StarletteFramesTransport)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_starlette_transport_closes_a_stalled_socket_by_default_and_says_so() -> None:
    """Without a close_timeout of its own, a 4008 to a client that stopped reading still ends
    with the TCP connection dropped (not ESTABLISHED with megabytes queued), and the transport
    tells the application, which counts it."""
    transports = await _shed_a_stalled_client_on_uvicorn(starlette_transport)
    assert transports[0].close_timeout == DEFAULT_CLOSE_TIMEOUT
    assert transports[0].close_timed_out
    assert transports[0].aborted


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_fast_path_is_said_once_not_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three connections that negotiate permessage-deflate on uvicorn: one line from the
    protocol (why) and one from starlette_transport (what it does instead), not three each."""
    _once._logged.clear()
    caplog.set_level(logging.INFO, logger="wsbroadcast.transports")
    for _ in range(3):
        _, transports = await _uvicorn_round(WebSocketProtocol, deflate=True)
        assert transports == [StarletteTransport]
    for name in ("wsbroadcast.transports.uvicorn", "wsbroadcast.transports.starlette"):
        lines = [r.getMessage() for r in caplog.records if r.name == name]
        assert len(lines) == 1, (name, lines)
    assert "permessage-deflate" in caplog.text


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a raw socket; return everything until the server closes."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):  # a timeout fails the test: the socket stayed open
            received += chunk
    return received


def _upgrade(target: str, headers: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
    ).encode()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_upgrade("/?pad=" + "p" * 9000), b"414"),
        (_upgrade("/", "".join(f"X-{n}: {n}\r\n" for n in range(200))), b"431"),
    ],
    ids=["request-line", "headers"],
)
async def test_uvicorn_protocol_sends_the_refusal_of_a_handshake_it_cannot_parse(
    request_bytes: bytes, status: bytes
) -> None:
    """``websockets`` refuses the request (414, 431) while parsing it; uvicorn's protocol
    never wrote that response and left the socket open. Here on uvicorn's own HTTP
    protocol, which has no limits of its own, so the request reaches the WebSocket one."""

    async def endpoint(websocket: WebSocket) -> None:
        raise AssertionError("not reached")

    async with _uvicorn(endpoint, WebSocketProtocol, deflate=False) as url:
        response = await anyio.to_thread.run_sync(_raw_exchange, url, request_bytes)
    assert response.startswith(b"HTTP/1.1 " + status + b" "), response[:200]
