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
import sys
import tracemalloc
from collections.abc import Iterator

import anyio
import anyio.abc
import pytest

from tests.chat_app.servers import ROOT, chat_in_process

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
    command = [sys.executable, "-m", "tests.chat_app.idle_clients"]
    tracemalloc.start()
    try:
        with anyio.fail_after(120):
            async with (
                chat_in_process() as port,
                await anyio.open_process([*command, str(port)], cwd=ROOT) as clients,
            ):
                await _open(clients, "warm", 20)
                with _untraced():
                    gc.collect()
                    before = tracemalloc.take_snapshot()
                    await _open(clients, "idle", MEASURED)
                    gc.collect()
                    after = tracemalloc.take_snapshot()
                assert clients.stdin is not None
                await clients.stdin.aclose()
    finally:
        tracemalloc.stop()
    grown = sorted(after.compare_to(before, "filename"), key=lambda stat: -stat.size_diff)
    per_connection = sum(stat.size_diff for stat in grown) / MEASURED
    where = "\n".join(f"{stat.size_diff / MEASURED:8.0f} {stat.traceback}" for stat in grown[:12])
    assert per_connection < BUDGET, f"{per_connection:.0f} bytes per connection:\n{where}"
