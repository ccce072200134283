"""Several rooms per connection and direct messages across two nodes on a real Redis."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, RedisServer
from wsbroadcast import Connection, ConnectionManager, user_room
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

WORKER = """
import sys

import anyio

from wsbroadcast import Publisher


async def main() -> None:
    async with Publisher(sys.argv[1]) as publisher:
        envelope = await publisher.send_direct("bob", {"message": "your order shipped"})
        print(envelope.text, flush=True)


anyio.run(main)
"""


def directs(transport: MemoryTransport) -> list[dict[str, Any]]:
    return [e for e in transport.envelopes() if e["type"] == "direct"]


async def tab(node: ConnectionManager, transport: MemoryTransport, client_id: str) -> Connection:
    connection = await node.connect(transport, client_id, "lobby")
    await node.join(connection, user_room(client_id))
    return connection


async def test_a_direct_message_reaches_every_tab_on_either_node_and_no_one_else(
    redis_server: RedisServer, make_backend: Callable[..., RedisBackend]
) -> None:
    async with (
        ConnectionManager(make_backend()) as node_a,
        ConnectionManager(make_backend()) as node_b,
    ):
        bob_a, bob_b = MemoryTransport(), MemoryBatchTransport()
        alice_a, alice_b, carol = MemoryTransport(), MemoryTransport(), MemoryTransport()
        await tab(node_a, bob_a, "bob")
        await tab(node_b, bob_b, "bob")
        await tab(node_a, alice_a, "alice")
        await tab(node_b, alice_b, "alice")
        await tab(node_b, carol, "carol")
        with anyio.fail_after(30):
            sent = await node_a.send_direct("bob", {"message": "hi"}, "alice")
            worker = await anyio.run_process([sys.executable, "-c", WORKER, redis_server.url])
            [printed] = worker.stdout.decode().splitlines()
            # Rooms are not ordered with each other: wait for each stream, then for carol's
            # lobby, published after both messages on the node carol is connected to.
            for transport, count in ((bob_a, 2), (bob_b, 2), (alice_a, 1), (alice_b, 1)):

                def arrived(transport: MemoryTransport, count: int = count) -> bool:
                    return len(directs(transport)) >= count

                await transport.wait_until(arrived)
            marker = await node_b.broadcast("lobby", "marker")
            await carol.wait_until(lambda t: t.texts[-1:] == [marker.text])
        assert [d["id"] for d in directs(bob_a)] == [sent.id, directs(bob_a)[1]["id"]]
        assert [f for f in bob_a.texts if '"direct"' in f][1] == printed
        for transport in (bob_a, bob_b):
            assert [(d["room"], d["seq"], d["client_id"]) for d in directs(transport)] == [
                ("@bob", 1, "alice"), ("@bob", 2, None),
            ]  # fmt: skip
        for transport in (alice_a, alice_b):
            assert [(d["room"], d["id"]) for d in directs(transport)] == [("@alice", sent.id)]
        assert directs(carol) == []


async def test_rooms_joined_on_either_node_keep_one_order_and_resume_through_the_other(
    make_backend: Callable[..., RedisBackend],
) -> None:
    async with (
        ConnectionManager(make_backend()) as node_a,
        ConnectionManager(make_backend()) as node_b,
    ):
        with anyio.fail_after(30):
            on_a = MemoryTransport()
            connection = await node_a.connect(on_a, "alice", "lobby")
            await node_a.join(connection, "red")
            await node_a.join(connection, "blue")
            for n in range(6):
                await node_b.broadcast(("red", "blue")[n % 2], n, "bob")
            await on_a.wait_until(lambda t: len(t.envelopes()) == 3 + 6)
            seen = {room: [e["seq"] for e in on_a.envelopes() if e["room"] == room]
                    for room in ("red", "blue")}  # fmt: skip
            assert seen == {"red": [1, 2, 3, 4], "blue": [1, 2, 3, 4]}
            epoch = on_a.envelopes()[-1]["epoch"]
            await node_a.disconnect(connection)
            for n in range(2):
                await node_a.broadcast("blue", f"missed {n}", "bob")
            # The same client resumes blue through node b from the last seq it saw.
            on_b = MemoryTransport()
            again = await node_b.connect(on_b, "alice", "lobby")
            await node_b.join(again, "blue", since=4, epoch=epoch)
            await on_b.wait_until(lambda t: any(m["type"] == "joined" for m in t.messages()))
            blue = [(m["type"], m.get("seq")) for m in on_b.messages() if m["room"] == "blue"]
            assert blue[:3] == [("leave", 5), ("message", 6), ("message", 7)]
            assert blue[-2:] == [("join", 8), ("joined", None)] or blue[3:] == [("joined", None)]
