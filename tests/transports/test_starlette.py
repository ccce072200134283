"""The Starlette adapter (wsbroadcast.transports.starlette): test client and real uvicorn."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tests.transports.support import (
    shed_a_stalled_client_on_uvicorn,
)
from wsbroadcast import CloseCode, Transport
from wsbroadcast.transports.base import BatchTransport, NowaitBatchTransport
from wsbroadcast.transports.starlette import (
    DEFAULT_CLOSE_TIMEOUT,
    StarletteFramesTransport,
    StarletteTransport,
    starlette_transport,
)


def test_starlette_transports_satisfy_the_protocols() -> None:
    assert issubclass(StarletteTransport, Transport)
    assert issubclass(StarletteFramesTransport, NowaitBatchTransport)
    assert not issubclass(StarletteTransport, BatchTransport)
    assert issubclass(WebSocket, Transport)


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


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_starlette_transport_closes_a_stalled_socket_by_default_and_says_so() -> None:
    """Without a close_timeout of its own, a 4008 to a client that stopped reading still ends
    with the TCP connection dropped (not ESTABLISHED with megabytes queued), and the transport
    tells the application, which counts it."""
    transports = await shed_a_stalled_client_on_uvicorn(starlette_transport)
    assert transports[0].close_timeout == DEFAULT_CLOSE_TIMEOUT
    assert transports[0].close_timed_out
    assert transports[0].aborted
