"""wsbroadcast's uvicorn WebSocket protocol (wsbroadcast.transports.uvicorn) on a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from tests.support import cyclic_garbage, kinds_from
from tests.transports.support import (
    FinishedProtocol,
    assert_join_then_300_broadcasts,
    raw_exchange,
    shed_a_stalled_client_on_uvicorn,
    upgrade_request,
    uvicorn_server,
)
from wsbroadcast import ConnectionManager
from wsbroadcast.testing import forget_logged_once
from wsbroadcast.transports.starlette import (
    StarletteFramesTransport,
    StarletteTransport,
    starlette_transport,
)
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol


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
            uvicorn_server(endpoint, protocol, deflate=deflate) as url,
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
        self.writable = asyncio.Event()
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
    assert_join_then_300_broadcasts(received)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_stops_reading_is_shed_and_dropped_on_uvicorn() -> None:
    [transport] = await shed_a_stalled_client_on_uvicorn(
        lambda websocket: starlette_transport(websocket, close_timeout=0.5)
    )
    assert isinstance(transport, StarletteFramesTransport)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_fast_path_is_said_once_not_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three connections that negotiate permessage-deflate on uvicorn: one line from the
    protocol (why) and one from starlette_transport (what it does instead), not three each."""
    forget_logged_once()
    caplog.set_level(logging.INFO, logger="wsbroadcast.transports")
    for _ in range(3):
        _, transports = await _uvicorn_round(WebSocketProtocol, deflate=True)
        assert transports == [StarletteTransport]
    for name in ("wsbroadcast.transports.uvicorn", "wsbroadcast.transports.starlette"):
        lines = [r.getMessage() for r in caplog.records if r.name == name]
        assert len(lines) == 1, (name, lines)
    assert "permessage-deflate" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_request("/?pad=" + "p" * 9000), b"414"),
        (upgrade_request("/", "".join(f"X-{n}: {n}\r\n" for n in range(200))), b"431"),
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

    async with uvicorn_server(endpoint, WebSocketProtocol, deflate=False) as url:
        response = await anyio.to_thread.run_sync(raw_exchange, url, request_bytes)
    assert response.startswith(b"HTTP/1.1 " + status + b" "), response[:200]


def test_configure_makes_a_subclass_with_other_limits() -> None:
    quiet = WebSocketProtocol.configure(max_write_buffer=1024, close_wait=0.5, offer_frames=False)
    assert issubclass(quiet, WebSocketProtocol)
    assert (quiet.max_write_buffer, quiet.close_wait, quiet.offer_frames) == (1024, 0.5, False)
    same = WebSocketProtocol.configure()  # None keeps every limit
    assert (same.max_write_buffer, same.close_wait, same.offer_frames) == (
        WebSocketProtocol.max_write_buffer,
        WebSocketProtocol.close_wait,
        True,
    )
    with pytest.raises(ValueError, match="max_write_buffer must be positive"):
        WebSocketProtocol.configure(max_write_buffer=0)
    with pytest.raises(ValueError, match="close_wait must be positive"):
        WebSocketProtocol.configure(close_wait=0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_protocol_that_does_not_offer_frames_serves_plain_asgi() -> None:
    received, transports = await _uvicorn_round(
        WebSocketProtocol.configure(offer_frames=False), deflate=False
    )
    assert transports == [StarletteTransport]
    assert_join_then_300_broadcasts(received)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_receive_cancelled_while_it_waits_loses_nothing_and_order_holds() -> None:
    # The protocol's own receive queue: a receive cancelled while it waits loses nothing,
    # and a burst of frames reaches the application whole and in order.
    got: list[str] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await websocket.receive()
        assert scope.cancelled_caught
        waiting = anyio.CancelScope()
        async with anyio.create_task_group() as tg:

            async def wait_then_give_up() -> None:
                with waiting:
                    await websocket.receive()

            tg.start_soon(wait_then_give_up)
            await anyio.wait_all_tasks_blocked()
            waiting.cancel()
        assert waiting.cancelled_caught
        await websocket.send_text("ready")
        while len(got) < 500:
            got.append(await websocket.receive_text())
        await websocket.send_text("done")

    with anyio.fail_after(30):
        async with (
            uvicorn_server(endpoint, WebSocketProtocol, deflate=False) as url,
            connect(url) as client,
        ):
            assert await client.recv() == "ready"
            for n in range(500):
                await client.send(str(n))
            assert await client.recv() == "done"
    assert got == [str(n) for n in range(500)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("closes", ["client", "server"])
async def test_a_closed_connection_is_freed_by_reference_counting_on_uvicorn(
    closes: str,
) -> None:
    # The extension's methods in the scope made a cycle with the protocol: every closed
    # connection waited for a full collection (see docs/performance.md).
    async with ConnectionManager() as manager:

        async def endpoint(websocket: WebSocket) -> None:
            connection = await manager.connect(starlette_transport(websocket), "reader")
            with connection.cancel_on_close():
                await websocket.receive()  # "close me", or the client's close
            await manager.disconnect(connection)

        # As the chat app serves: with wsbroadcast's HTTP protocol too (uvicorn's keeps a
        # cycle with its parser). The event loop here is asyncio's own, whose socket
        # transports keep a cycle of their own (uvloop's do not): not checked.
        http = HttpToolsProtocol
        async with uvicorn_server(endpoint, FinishedProtocol, deflate=False, http=http) as url:
            for _ in range(2):  # the first connection makes what uvicorn makes once
                FinishedProtocol.done = anyio.Event()
                with cyclic_garbage() as garbage, anyio.fail_after(30):
                    async with connect(url) as client:
                        assert json.loads(await client.recv())["type"] == "join"
                        await manager.broadcast("lobby", "to the reader", "writer")
                        assert json.loads(await client.recv())["data"] == "to the reader"
                        if closes == "server":
                            await client.send("close me")
                            await client.wait_closed()
                    await FinishedProtocol.done.wait()
    assert kinds_from(garbage, "wsbroadcast", "uvicorn", "starlette") == []
