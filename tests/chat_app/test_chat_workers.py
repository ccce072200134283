"""``--workers N``: one port served by N processes (SO_REUSEPORT) that share rooms on Redis."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.backends.redis.redis_helpers import RedisServer

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer


ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 24
DEADLINE = 30.0


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(part) for part in text.split()]


def sockets(pid: int) -> int:
    """How many sockets the process holds open."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += fd.readlink().name.startswith("socket:")
    return count


def gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # polling a server's state, bounded by the deadline


async def recv(ws: ClientConnection) -> Any:
    with anyio.fail_after(10):
        return json.loads(await ws.recv())


def test_more_than_one_worker_on_memory_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.chat_app", "--workers", "2", "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--workers 2 needs a backend the workers share" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["uvicorn", "websockets"])
async def test_workers_share_one_port_and_one_order_and_stop_together(
    start_server: StartServer, kind: str
) -> None:
    redis = RedisServer(shutil.which("redis-server") or "redis-server")
    redis.start()
    try:
        server: ChatServer = start_server("--backend", redis.url, "--workers", "2", kind=kind)
        assert server.process is not None
        parent = server.process.pid
        wait_for(lambda: len(children(parent)) == 2, "two workers")
        wait_for(lambda: server.stderr().count(server.ready_line) == 2, "both workers serving")
        workers = children(parent)
        before = {pid: sockets(pid) for pid in workers}
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(connect(f"{server.ws_url}/ws/c{n}?room=w"))
                for n in range(CLIENTS)
            ]
            # Each one's live stream starts at its own join, after the accept the client saw.
            for n, ws in enumerate(clients):
                while (frame := await recv(ws))["type"] != "join" or frame["client_id"] != f"c{n}":
                    pass
            # Both workers took some of the connections (the kernel spreads them by hash).
            for pid in workers:
                assert sockets(pid) > before[pid], f"worker {pid} got no connection"
            await clients[0].send(json.dumps({"message": "to everyone"}))
            seqs = []
            for ws in clients:
                while (frame := await recv(ws)).get("data") != {"message": "to everyone"}:
                    pass
                seqs.append((frame["seq"], frame["epoch"]))
            assert len(set(seqs)) == 1  # one envelope, one seq, whichever worker delivered it
        server.stop()
        assert server.process is None
        for pid in workers:
            assert gone(pid)
        assert "Traceback" not in server.stderr()
    finally:
        redis.kill()
