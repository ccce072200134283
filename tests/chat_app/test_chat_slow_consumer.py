"""A client that stops reading must not slow down the others (end to end, over loopback)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.chat_app.frames import next_frame as next_chat_frame

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

HEALTHY = 20
TEXT = "x" * 3900  # about 4 KB a frame
QUEUE_SIZE = 16
SEND_BUFFER = 65536
# Enough to fill what a stalled client can hold, three times over: the kernel's send buffer
# (SO_SNDBUF, doubled by Linux), the server's write buffer (64 KiB on uvicorn, less on
# websockets), the client's small receive buffer, then the connection's queue.
MESSAGES = 3 * ((2 * SEND_BUFFER + 65536 + 16384) // 4000 + QUEUE_SIZE)


@pytest.fixture(scope="module")
def server(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server(
        "--rate-limit", "0",
        "--queue-size", str(QUEUE_SIZE),
        "--send-buffer", str(SEND_BUFFER),
        kind=server_kind,
    )  # fmt: skip


@pytest.fixture
def stalled(server: ChatServer) -> Iterator[socket.socket]:
    """A raw TCP socket that does the WebSocket handshake by hand, then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET /ws/stalled?room=slow HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request.encode())
        response = b""
        while not response.endswith(b"\r\n\r\n"):  # one byte at a time: leave frames unread
            byte = sock.recv(1)
            assert byte, "the server closed during the handshake"
            response += byte
        assert response.startswith(b"HTTP/1.1 101"), response
        yield sock
    finally:
        sock.close()


async def next_frame(ws: ClientConnection) -> Any:
    return await next_chat_frame(ws, 30)


def metric(server: ChatServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, flags=re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stalled_reader_does_not_slow_down_the_healthy_ones(
    server: ChatServer, stalled: socket.socket
) -> None:
    url = f"{server.ws_url}/ws/{{}}?room=slow"
    received: dict[str, list[Any]] = {}
    done: list[anyio.Event] = []

    async def read(client_id: str, ws: ClientConnection, finished: anyio.Event) -> None:
        """Read until every message arrived and the stalled client was seen leaving."""
        frames = received[client_id] = []
        while not (
            sum(f["type"] == "message" for f in frames) == MESSAGES
            and any(f["type"] == "leave" and f["client_id"] == "stalled" for f in frames)
        ):
            frames.append(await next_frame(ws))
        finished.set()
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:  # keep draining until closed, so the closing handshake completes
                pass

    async with anyio.create_task_group() as task_group:
        clients = []
        for n in range(HEALTHY):
            client_id = f"healthy-{n}"
            ws = await connect(url.format(client_id))
            clients.append(ws)
            frame = await next_frame(ws)
            assert (frame["type"], frame["client_id"]) == ("join", client_id)
            done.append(anyio.Event())
            task_group.start_soon(read, client_id, ws, done[-1])

        # The sender waits for its own echo before the next message, so healthy queues stay
        # short; only the client that stopped reading can fill its queue.
        async with connect(url.format("sender")) as sender:
            assert (await next_frame(sender))["type"] == "join"
            for n in range(MESSAGES):
                await sender.send(json.dumps({"message": f"{n} {TEXT}"}))
                while (frame := await next_frame(sender))["type"] != "message":
                    pass
                assert frame["data"]["message"].startswith(f"{n} ")
        with anyio.fail_after(30):
            for finished in done:
                await finished.wait()
        # The stalled connection is counted once its socket is closed, which may come after
        # its leave (bounded by the server's close wait). Checked before the healthy clients
        # leave all at once: their burst of leaves may overflow the queues of the others,
        # which are closing too.
        with anyio.fail_after(10):
            # The count lives in the server process: no event to await, so poll /metrics.
            while metric(server, "chat_slow_consumer_disconnects_total") < 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert metric(server, "chat_slow_consumer_disconnects_total") == 1
        for ws in clients:
            task_group.start_soon(ws.close)

    for client_id, frames in received.items():
        texts = [f["data"]["message"].split()[0] for f in frames if f["type"] == "message"]
        assert texts == [str(n) for n in range(MESSAGES)], client_id
        seqs = [f["seq"] for f in frames]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap for {client_id}"
    assert "Traceback" not in server.stderr()
