"""Presence changes cancelled at every await point leave Redis and the node in agreement.

A connect cancelled while Redis is busy used to leave the client in presence forever: the
script ran in Redis, the caller was cancelled before the reply, and the node discounted it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, RedisServer
from wsbroadcast import Connection, ConnectionManager
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.testing import MemoryTransport

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

Make = Callable[..., RedisBackend]

STAGES = ["before-send", "waiting-for-a-connection", "in-flight", "after-reply"]


async def counts(backend: RedisBackend, room: str, client_id: str) -> tuple[int, int]:
    """(connections Redis counts for this node, connections the node counts)."""
    assert backend._redis is not None
    raw = await backend._redis.hget(f"wsbroadcast:room:{room}:client:{client_id}", backend.node_id)
    return int(raw or 0), backend._presence[room, client_id]


async def cancel_during(
    backend: RedisBackend,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    stage: str,
    call: Callable[[], Awaitable[object]],
) -> list[object]:
    """Run ``call`` and cancel it at ``stage`` of its ``script``; return what it returned.

    ``in-flight``: Redis is stopped (SIGSTOP) when the command is sent, so the reply cannot
    have come when the cancellation does. ``waiting-for-a-connection``: the node's only
    pooled connection is busy with another command to the stopped Redis.
    """
    real = getattr(backend, script)
    reached = anyio.Event()
    scope = anyio.CancelScope()
    results: list[object] = []

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if stage == "before-send":
            scope.cancel()
        else:
            reached.set()
        result = await real(*args, **kwargs)
        if stage == "after-reply":
            scope.cancel()
        return result

    monkeypatch.setattr(backend, script, wrapper)

    async def run() -> None:
        with scope:
            results.append(await call())

    stopped = stage in ("in-flight", "waiting-for-a-connection")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            if stopped:
                redis_server.stop()
            try:
                if stage == "waiting-for-a-connection":
                    group.start_soon(backend.presence, "elsewhere")
                    await anyio.lowlevel.checkpoint()
                group.start_soon(run)
                if stage != "before-send":
                    await reached.wait()
                    await anyio.lowlevel.checkpoint()
                    scope.cancel()
            finally:
                if stopped:
                    redis_server.resume()
    monkeypatch.setattr(backend, script, real)
    return results


@pytest.mark.parametrize("stage", STAGES)
async def test_cancelled_add_presence_keeps_counts_equal(
    make_backend: Make, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    async with make_backend(max_connections=1) as a, make_backend() as b:
        results = await cancel_during(
            a,
            redis_server,
            monkeypatch,
            "_add_presence_script",
            stage,
            lambda: a.add_presence("r", "alice"),
        )
        in_redis, local = await counts(a, "r", "alice")
        assert in_redis == local
        # If the call returned, the caller holds the presence (and knows it): it removes it.
        assert local == len(results)
        if results:
            assert results == [True]
            assert await a.remove_presence("r", "alice")
        assert await counts(a, "r", "alice") == (0, 0)
        assert await b.presence("r") == []
        # A later connection of alice is her first again.
        assert await b.add_presence("r", "alice")


@pytest.mark.parametrize("stage", ["in-flight", "after-reply"])
async def test_cancelled_remove_presence_keeps_counts_equal(
    make_backend: Make, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    async with make_backend(max_connections=1) as a, make_backend() as b:
        assert await a.add_presence("r", "alice")
        assert not await a.add_presence("r", "alice")
        await cancel_during(
            a,
            redis_server,
            monkeypatch,
            "_remove_presence_script",
            stage,
            lambda: a.remove_presence("r", "alice"),
        )
        assert await counts(a, "r", "alice") == (1, 1)
        assert await a.remove_presence("r", "alice")
        assert await b.presence("r") == []


@pytest.mark.parametrize("stage", STAGES)
async def test_cancelled_connect_leaves_no_ghost_and_a_later_connect_joins(
    make_backend: Make,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    backend = make_backend(max_connections=1)
    async with ConnectionManager(backend) as manager:
        watcher = MemoryTransport()
        await manager.connect(watcher, "bob", "room")
        with anyio.fail_after(10):
            await watcher.wait_for_messages(1)
            await cancel_during(
                backend,
                redis_server,
                monkeypatch,
                "_add_presence_script",
                stage,
                lambda: manager.connect(MemoryTransport(), "alice", "room"),
            )
            assert await manager.presence("room") == ["bob"]
            assert await counts(backend, "room", "alice") == (0, 0)
            seen = len(watcher.texts)
            await manager.connect(MemoryTransport(), "alice", "room")
            await watcher.wait_until(
                lambda t: any(
                    m.get("type") == "join" and m.get("client_id") == "alice"
                    for m in t.messages()[seen:]
                )
            )
        assert await manager.presence("room") == ["alice", "bob"]


async def test_redis_side_counts_equal_after_many_cancelled_connects(
    make_backend: Make, redis_server: RedisServer
) -> None:
    """Connects cancelled at whatever point a burst of them happens to be in."""
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        async with ConnectionManager(make_backend(max_connections=2)) as manager:
            opened: list[Connection] = []

            async def connect(n: int) -> None:
                opened.append(await manager.connect(MemoryTransport(), f"c{n}", "burst"))

            with anyio.fail_after(10):
                for turns in range(12):
                    async with anyio.create_task_group() as group:
                        for n in range(5):
                            group.start_soon(connect, n)
                        for _ in range(turns):
                            await anyio.lowlevel.checkpoint()
                        group.cancel_scope.cancel()
                    # The connects that returned hold their presence: their callers close them.
                    for connection in opened:
                        await manager.disconnect(connection)
                    opened.clear()
                    backend = manager.backend
                    assert isinstance(backend, RedisBackend)
                    for n in range(5):
                        assert await counts(backend, "burst", f"c{n}") == (0, 0), turns
                assert await manager.presence("burst") == []
    finally:
        await admin.aclose()
