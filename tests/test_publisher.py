"""Publishing as the server, from a Publisher without sockets, and rooms without announcements."""

from __future__ import annotations

import json

import pytest

from wsbroadcast import (
    ConnectionManager,
    InvalidInput,
    InvalidName,
    ManagerNotRunning,
    Publisher,
)
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio


async def test_a_broadcast_without_a_client_comes_from_the_server() -> None:
    async with ConnectionManager() as manager:
        alice = MemoryTransport()
        await manager.connect(alice, "alice", "news")
        envelope = await manager.broadcast("news", {"headline": "hi"})
        assert envelope.client_id is None
        await alice.wait_for_messages(2)
        wire = json.loads(alice.texts[-1])
        assert wire["client_id"] is None
        assert '"client_id":null' in alice.texts[-1]


@pytest.mark.parametrize("forged", ["", "null", "None"])
async def test_no_client_can_pass_itself_off_as_the_server(forged: str) -> None:
    async with ConnectionManager() as manager:
        if forged == "":
            with pytest.raises(InvalidName):
                await manager.connect(MemoryTransport(), forged, "news")
            with pytest.raises(InvalidName):
                await manager.broadcast("news", "x", forged)
        else:
            envelope = await manager.broadcast("news", "x", forged)
            assert envelope.client_id == forged  # a string, never JSON null
            assert f'"client_id":"{forged}"' in envelope.text


async def test_a_publisher_shares_a_backend_with_a_manager_in_one_process() -> None:
    backend = MemoryBackend()
    async with ConnectionManager(backend) as manager, Publisher(backend) as publisher:
        fast, plain = MemoryBatchTransport(), MemoryTransport()
        await manager.connect(fast, "fast", "orders")
        await manager.connect(plain, "plain", "orders")
        sent = await publisher.publish("orders", {"status": "shipped"})
        by_worker = await publisher.publish("orders", "done", client_id="worker-1", type="audit")
        for transport in (fast, plain):
            await transport.wait_until(
                lambda t: bool(t.envelopes()) and t.envelopes()[-1]["seq"] >= by_worker.seq
            )
            assert transport.texts[-2:] == [sent.text, by_worker.text]
        assert await publisher.presence("orders") == ["fast", "plain"]
    assert sent.client_id is None
    assert (by_worker.client_id, by_worker.type) == ("worker-1", "audit")


async def test_a_publisher_checks_what_it_publishes_and_needs_async_with() -> None:
    publisher = Publisher("memory://")
    with pytest.raises(ManagerNotRunning):
        await publisher.publish("room", "x")
    with pytest.raises(ManagerNotRunning):
        await publisher.send_direct("alice", "x")
    async with publisher:
        with pytest.raises(InvalidInput):
            await publisher.publish("room", "x", type="history_lost")
        with pytest.raises(InvalidInput):
            await publisher.publish("room", "\ud800")
        with pytest.raises(InvalidName):
            await publisher.publish("bad room", "x")
        assert (await publisher.publish("room", "ok")).seq == 1


async def test_rooms_can_go_without_join_and_leave_presence_still_answers() -> None:
    quiet = {"lobby"}
    async with ConnectionManager(announce=lambda room: room not in quiet) as manager:
        watcher, other = MemoryTransport(), MemoryTransport()
        await manager.connect(watcher, "watcher", "lobby")
        await manager.connect(other, "watcher", "loud")
        alice = await manager.connect(MemoryTransport(), "alice", "lobby")
        assert await manager.presence("lobby") == ["alice", "watcher"]
        await manager.disconnect(alice)
        assert await manager.presence("lobby") == ["watcher"]
        last = await manager.broadcast("lobby", "after")
        await watcher.wait_until(lambda t: bool(t.envelopes()))
        assert [e["type"] for e in watcher.envelopes()] == ["message"]
        assert last.seq == 1  # no join or leave took a seq
        await other.wait_for_messages(1)
        assert [e["type"] for e in other.envelopes()] == ["join"]
        assert manager.announces("loud")
        assert not manager.announces("lobby")
