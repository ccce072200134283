"""The websockets adapter (wsbroadcast.transports.websockets) against a real websockets server."""

from __future__ import annotations

import json
import socket
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.support import cyclic_garbage, kinds_from
from tests.transports.support import (
    STALLED_BUFFER,
    assert_join_then_300_broadcasts,
    flood_until_closed,
    stalled_client,
)
from wsbroadcast import CloseCode, Connection, ConnectionManager
from wsbroadcast.transports.base import BatchTransport
from wsbroadcast.transports.websockets import WebsocketsTransport


def test_websockets_transport_satisfies_the_batch_protocol() -> None:
    assert issubclass(WebsocketsTransport, BatchTransport)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_websockets_adapter_broadcasts_and_survives_a_vanished_client() -> None:
    async with ConnectionManager() as manager:

        async def handler(websocket: ServerConnection) -> None:
            client_id = websocket.request.path.rsplit("/", 1)[-1] if websocket.request else "x"
            connection = await manager.connect(WebsocketsTransport(websocket), client_id)
            try:
                async for text in websocket:
                    assert isinstance(text, str)
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
    assert_join_then_300_broadcasts(received)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_stops_reading_is_shed_on_the_fast_path() -> None:
    async with ConnectionManager(queue_size=8) as manager:
        closed: list[Connection] = []

        async def handler(websocket: ServerConnection) -> None:
            websocket.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, STALLED_BUFFER
            )
            transport = WebsocketsTransport(websocket, close_timeout=0.5)
            connection = await manager.connect(transport, "stalled")
            closed.append(connection)
            await connection.wait_closed()

        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            async with stalled_client(f"ws://127.0.0.1:{port}/") as join:
                assert json.loads(join)["type"] == "join"
                await flood_until_closed(manager, closed)
                assert closed[0].close_code == CloseCode.SLOW_CONSUMER
                # The close frame could not get through the full buffer: the TCP connection
                # was dropped instead of waiting for keepalive to give up.
                stalled_transport = closed[0].transport
                assert isinstance(stalled_transport, WebsocketsTransport)
                assert stalled_transport.close_timed_out
                assert stalled_transport.aborted
                assert stalled_transport.connection.transport.is_closing()
                assert manager.statistics().slow_consumer_disconnects == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_closed_connection_is_freed_by_reference_counting_on_websockets() -> None:
    async with ConnectionManager() as manager:
        done = anyio.Event()

        async def handler(websocket: ServerConnection) -> None:
            connection = await manager.connect(WebsocketsTransport(websocket), "reader")
            try:
                await websocket.wait_closed()
            finally:
                await manager.disconnect(connection)
                done.set()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(2):  # the first connection makes what the server makes once
                done = anyio.Event()
                with cyclic_garbage() as garbage, anyio.fail_after(30):
                    async with connect(f"ws://127.0.0.1:{port}/") as client:
                        assert json.loads(await client.recv())["type"] == "join"
                        await manager.broadcast("lobby", "to the reader", "writer")
                        assert json.loads(await client.recv())["data"] == "to the reader"
                    await done.wait()
    # The websockets library's own objects are not checked: the client's are in the mix.
    assert kinds_from(garbage, "wsbroadcast") == []
