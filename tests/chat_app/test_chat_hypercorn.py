"""Issue 10 end to end: the chat app on hypercorn's trio worker, whose sends ignore cancellation.

hypercorn (``-k trio``) writes every outgoing byte in ``trio.CancelScope(shield=True)``, so a
send to a client that stopped reading cannot be cancelled: it ends only when the socket is
closed under it. The Starlette app, its manager and the memory backend run as a user runs
them (``python -m hypercorn --worker-class trio 'module:expression'``, a subprocess on
127.0.0.1); a raw client completes its handshake and never reads, and a watcher makes its
queue overflow. The watcher must see its ``leave`` at once and presence must drop it,
although its writer is still stuck in that send; then SIGTERM must end the server, exit
status 0. Before the fix (the writer itself announced the departure once its send returned)
neither happened: no ``leave`` and the client still in presence for as long as it kept its
socket open, and hypercorn's worker never exited after SIGTERM.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.chat_app.frames import next_frame as next_chat_frame
from tests.chat_app.rawsock import raw_websocket

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

ROOM = "stall"
QUEUE_SIZE = 4
TEXT = "x" * 60_000  # about 60 KB a frame: under the app's 64 KiB frame limit
MAX_MESSAGES = 400
"""About 24 MB for the stalled client, at most: several times what the kernel can buffer
for it (its send buffer autotunes up to net.ipv4.tcp_wmem's 4 MiB, and the client's receive
buffer is 4 KiB), plus its queue. The watcher stops sending as soon as it sees the leave."""
GRACEFUL_TIMEOUT = 2
"""hypercorn's ``--graceful-timeout``: on SIGTERM, how long connections may stay open
before they are cancelled (then a connection's socket is closed, which ends a stuck send)."""
APP = (
    "examples.chat_app.app:create_app(Settings("
    f"queue_size={QUEUE_SIZE}, rate_limit=0, max_text={len(TEXT) + 100}))"
)
"""The chat app with a small queue and no rate limit, built by hypercorn's loader (it
evaluates what follows the colon in the module's namespace)."""


@pytest.fixture
def server(start_server: StartServer) -> ChatServer:
    return start_server("--graceful-timeout", str(GRACEFUL_TIMEOUT), APP, kind="hypercorn")


async def next_frame(ws: ClientConnection) -> Any:
    return await next_chat_frame(ws, 15)  # a hang guard


def is_join(frame: Any, client_id: str) -> bool:
    return bool(frame["type"] == "join" and frame["client_id"] == client_id)


def is_leave_of(frame: Any, client_id: str) -> bool:
    return bool(frame["type"] == "leave" and frame["client_id"] == client_id)


def online(server: ChatServer) -> list[str]:
    response = httpx.get(f"{server.url}/rooms/{ROOM}", timeout=5)
    assert response.status_code == 200, response.text
    return list(response.json()["online"])


def metric(server: ChatServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_a_stalled_client_leaves_at_once_and_sigterm_ends_hypercorn(
    server: ChatServer,
) -> None:
    process = server.process
    assert process is not None
    async with connect(f"{server.ws_url}/ws/watcher?room={ROOM}") as watcher:
        assert is_join(await next_frame(watcher), "watcher")
        stalled = raw_websocket(server.port, f"/ws/stalled?room={ROOM}")
        try:
            while not is_join(await next_frame(watcher), "stalled"):
                pass
            assert online(server) == ["stalled", "watcher"]

            # Overflow the stalled client's queue: each message waits for its own echo, so
            # only the client that does not read falls behind. Its writer ends up in a send
            # that hypercorn shields from cancellation, and stays there.
            left = False
            with anyio.fail_after(15):  # a hang guard, not a timing assertion
                for n in range(MAX_MESSAGES):
                    await watcher.send(json.dumps({"message": f"{n} {TEXT}"}))
                    while True:
                        frame = await next_frame(watcher)
                        left = left or is_leave_of(frame, "stalled")
                        if frame["type"] == "message":
                            assert frame["data"]["message"].startswith(f"{n} ")
                            break
                        assert frame["type"] == "leave", frame
                    if left:
                        break
                while not left:  # every message sent and echoed: the leave is still owed
                    left = is_leave_of(await next_frame(watcher), "stalled")
            # Presence is updated before the leave is published: no wait needed.
            assert online(server) == ["watcher"]
            assert metric(server, "chat_slow_consumer_disconnects_total") == 1

            # SIGTERM while the stalled client still holds the send (its socket is open and
            # unread) and the watcher is connected. hypercorn cancels its connections after
            # the graceful timeout, but closes a socket only once the connection's app task
            # has returned; the stalled one's waits (shielded) for the manager's closer, which
            # gives up on the stuck writer after close_timeout and on the close frame after
            # the transport's close wait. Then hypercorn closes that socket, which ends the
            # shielded send, and the lifespan's manager exits.
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(30):  # a hang guard
                try:
                    while True:  # until the server closes the watcher
                        await watcher.recv()
                except ConnectionClosed:
                    pass
            try:
                status = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                pytest.fail(f"hypercorn still running 30 s after SIGTERM:\n{server.stderr()}")
        finally:
            stalled.close()
    assert status == 0, server.stderr()
    assert "Traceback" not in server.stderr()
