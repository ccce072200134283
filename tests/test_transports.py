"""The transport adapters against real servers over loopback."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from wsbroadcast import CloseCode, ConnectionManager, Transport
from wsbroadcast.testing import MemoryTransport
from wsbroadcast.transports.starlette import StarletteTransport
from wsbroadcast.transports.websockets import WebsocketsTransport


def test_transports_satisfy_the_protocol() -> None:
    assert isinstance(MemoryTransport(), Transport)
    assert issubclass(StarletteTransport, Transport)
    assert issubclass(WebsocketsTransport, Transport)
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
        transport = StarletteTransport(websocket)
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
