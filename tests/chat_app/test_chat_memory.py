"""What an idle chat connection costs the server on uvicorn, served as ``python -m
examples.chat_app`` serves it (on uvloop): issue 14's budget is 20 KiB per connection.

Counted as the Python allocations (``tracemalloc``) of the server's process, which is the
test's own, while the clients run in another (``tests.chat_app.idle_clients``), over 200
connections in one room after 20 that warm it up. RSS, which the benchmark reads, also holds
the allocator's slack; this is the part the code decides, and what a change that keeps
something per connection (a timer, a parsed header, a generator) adds to.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
import uvicorn

from examples.chat_app.app import create_app
from examples.chat_app.service import CLOSE_WAIT, Settings
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 20 * 1024
MEASURED = 200


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Without the tracer of the coverage run (``sys.settrace``), if any: it gives every frame
    it sees a frame object, which a coroutine keeps for its life, about 5 KiB per connection
    that no server has."""
    tracer = sys.gettrace()
    sys.settrace(None)
    try:
        yield
    finally:
        sys.settrace(tracer)


async def _open(clients: anyio.abc.Process, prefix: str, count: int) -> None:
    assert clients.stdin is not None
    assert clients.stdout is not None
    await clients.stdin.send(f"open {prefix} {count}\n".encode())
    assert (await clients.stdout.receive()).strip() == b"ok"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_an_idle_chat_connection_costs_the_server_less_than_20_kib() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    port = listener.getsockname()[1]
    settings = Settings(rate_limit=0, max_connections_per_ip=0)
    config = uvicorn.Config(
        create_app(settings),
        http=HttpToolsProtocol.configure(head_timeout=settings.handshake_timeout),
        ws=WebSocketProtocol.configure(close_wait=CLOSE_WAIT),
        ws_per_message_deflate=False,
        ws_max_size=settings.max_message_bytes,
        lifespan="on",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    command = [sys.executable, "-m", "tests.chat_app.idle_clients", str(port)]
    tracemalloc.start()
    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [listener])
                async with await anyio.open_process(command, cwd=ROOT) as clients:
                    await _open(clients, "warm", 20)
                    with _untraced():
                        gc.collect()
                        before = tracemalloc.take_snapshot()
                        await _open(clients, "idle", MEASURED)
                        gc.collect()
                        after = tracemalloc.take_snapshot()
                    assert clients.stdin is not None
                    await clients.stdin.aclose()
                server.should_exit = True
    finally:
        tracemalloc.stop()
        listener.close()
    grown = sorted(after.compare_to(before, "filename"), key=lambda stat: -stat.size_diff)
    per_connection = sum(stat.size_diff for stat in grown) / MEASURED
    where = "\n".join(f"{stat.size_diff / MEASURED:8.0f} {stat.traceback}" for stat in grown[:12])
    assert per_connection < BUDGET, f"{per_connection:.0f} bytes per connection:\n{where}"
