"""The real ConnectionManager on two RedisBackend nodes, with in-memory sockets."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest
from redis.asyncio import Redis

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, RedisServer
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
            await on_a.wait_for_messages(1)
            message = await node_b.broadcast("room", {"text": "hi"}, "bob")
            await on_a.wait_for_messages(2)
            assert [(m["type"], m["seq"]) for m in on_a.envelopes()] == [
                ("join", 1),
                ("message", 2),
            ]
            assert on_a.texts[1] == message.text

            # alice's second tab comes in through node b, having seen only her join.
            on_b = MemoryTransport()
            second = await node_b.connect(on_b, "alice", "room", since=1)
            await on_b.wait_for_messages(1)
            assert on_b.texts == [message.text]  # history, and no second join
            assert await node_a.presence("room") == ["alice"]

            later = await node_a.broadcast("room", "both", "carol")
            await on_a.wait_for_messages(3)
            await on_b.wait_for_messages(2)
            assert on_a.texts[2] == on_b.texts[1] == later.text

            await node_a.disconnect(first)
            await node_b.broadcast("room", "still here?", "bob")
            await on_b.wait_for_messages(3)
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


async def test_flushall_gives_every_live_connection_history_lost_first(
    make_backend: Callable[..., RedisBackend], redis_server: RedisServer
) -> None:
    admin = Redis.from_url(redis_server.url)
    try:
        async with (
            ConnectionManager(make_backend()) as node_a,
            ConnectionManager(make_backend()) as node_b,
        ):
            with anyio.fail_after(10):
                clients = [("alice", node_a), ("bob", node_b), ("carol", node_a)]
                transports = []
                for client_id, node in clients:
                    transport = MemoryTransport()
                    await node.connect(transport, client_id, "room")
                    transports.append(transport)
                old = await node_b.broadcast("room", "before", "bob")
                for transport in transports:
                    await transport.wait_until(
                        lambda t: any(m.get("id") == old.id for m in t.messages())
                    )
                marks = [len(transport.texts) for transport in transports]

                await admin.flushall()
                new = await node_b.broadcast("room", "after", "bob")
                for transport in transports:
                    await transport.wait_until(
                        lambda t: any(m.get("id") == new.id for m in t.messages())
                    )
        assert new.epoch != old.epoch
        for transport, mark in zip(transports, marks, strict=True):
            after = transport.messages()[mark:]
            lost = after[0]
            assert lost["type"] == "history_lost", after
            assert lost["data"]["epoch"] == new.epoch
            assert lost["data"]["last_seq"] == 0
            # Then the new stream only, from its start, with no second history_lost.
            envelopes = after[1:]
            assert all("seq" in m for m in envelopes), after
            assert [m["epoch"] for m in envelopes] == [new.epoch] * len(envelopes)
            assert [m["seq"] for m in envelopes] == list(range(1, len(envelopes) + 1))
            assert new.id in [m["id"] for m in envelopes]
    finally:
        await admin.aclose()


@pytest.mark.parametrize("since", [2**64, 10**30, 2**63])
async def test_resume_beyond_any_seq_is_history_lost_not_an_error(
    make_backend: Callable[..., RedisBackend], since: int
) -> None:
    async with ConnectionManager(make_backend()) as node:
        with anyio.fail_after(10):
            await node.broadcast("room", "x", "bob")
            transport = MemoryTransport()
            await node.connect(transport, "alice", "room", since=since)
            await transport.wait_until(
                lambda t: any(m["type"] == "history_lost" for m in t.messages())
            )
        assert transport.close_code is None
        lost = next(m for m in transport.messages() if m["type"] == "history_lost")
        assert lost["data"]["since"] == since


async def test_own_join_first_while_another_node_publishes(
    make_backend: Callable[..., RedisBackend],
) -> None:
    """Connections join on node a while node b publishes to the room without pause: each
    new connection's first frame is its own join, and the seqs after it are gap-free (the
    envelopes numbered before its join, read by node a meanwhile, are not delivered)."""
    async with (
        ConnectionManager(make_backend()) as node_a,
        ConnectionManager(make_backend()) as node_b,
    ):
        await node_a.connect(MemoryTransport(), "anchor", "busy")  # node a reads the room
        stop = anyio.Event()
        published = 0

        async def publish() -> None:
            nonlocal published
            while not stop.is_set():
                await node_b.broadcast("busy", published, "publisher")
                published += 1

        transports = [MemoryTransport() for _ in range(20)]
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(publish)
                while published < 5:
                    await anyio.lowlevel.checkpoint()
                for i, transport in enumerate(transports):
                    await node_a.connect(transport, f"c{i}", "busy")
                stop.set()
            last = await node_b.broadcast("busy", "end", "publisher")
            for transport in transports:
                await transport.wait_until(
                    lambda t: bool(t.envelopes()) and t.envelopes()[-1]["seq"] >= last.seq
                )
        assert published > 20  # the publisher really ran during the connects
        for i, transport in enumerate(transports):
            envelopes = transport.envelopes()
            assert (envelopes[0]["type"], envelopes[0]["client_id"]) == ("join", f"c{i}")
            seqs = [e["seq"] for e in envelopes]
            assert seqs == list(range(seqs[0], last.seq + 1)), f"c{i}: {seqs}"
