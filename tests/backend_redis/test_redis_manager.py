"""The real ConnectionManager on two RedisBackend nodes, with in-memory sockets."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from redis_helpers import ASYNCIO_ONLY

from wsbroadcast import ConnectionManager
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.testing import MemoryTransport

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]


async def test_connect_on_a_broadcast_on_b_resume_on_b(
    make_backend: Callable[..., RedisBackend],
) -> None:
    async with (
        ConnectionManager(make_backend()) as node_a,
        ConnectionManager(make_backend()) as node_b,
    ):
        with anyio.fail_after(10):
            on_a = MemoryTransport()
            first = await node_a.connect(on_a, "alice", "room")
            await on_a.wait_for_frames(1)
            message = await node_b.broadcast("room", {"text": "hi"}, "bob")
            await on_a.wait_for_frames(2)
            assert [(m["type"], m["seq"]) for m in on_a.envelopes()] == [
                ("join", 1),
                ("message", 2),
            ]
            assert on_a.frames[1] == message.text

            # alice's second tab comes in through node b, having seen only her join.
            on_b = MemoryTransport()
            second = await node_b.connect(on_b, "alice", "room", since=1)
            await on_b.wait_for_frames(1)
            assert on_b.frames == [message.text]  # history, and no second join
            assert await node_a.presence("room") == ["alice"]

            later = await node_a.broadcast("room", "both", "carol")
            await on_a.wait_for_frames(3)
            await on_b.wait_for_frames(2)
            assert on_a.frames[2] == on_b.frames[1] == later.text

            await node_a.disconnect(first)
            await node_b.broadcast("room", "still here?", "bob")
            await on_b.wait_for_frames(3)
            assert [m["type"] for m in on_b.envelopes()] == ["message", "message", "message"]
            await node_b.disconnect(second)
            assert await node_a.presence("room") == []
            history = await node_a.backend.history("room", 0)
            assert [e.type for e in history.envelopes] == [
                "join",
                "message",
                "message",
                "message",
                "leave",
            ]
