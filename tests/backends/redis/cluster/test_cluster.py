"""The real ConnectionManager on two RedisClusterBackend nodes, on a real local Redis Cluster.

Three primaries with one replica each (``conftest.py``). Rooms spread over the primaries by
their partition's hash tag; these tests place rooms on every primary on purpose, and kill a
primary with ``kill -9`` mid-stream.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import anyio
import pytest

from tests.backends.redis.cluster.cluster_helpers import (
    ASYNCIO_ONLY,
    LocalCluster,
    audit,
    command,
    node_factory,
    rooms_per_primary,
)
from wsbroadcast import ConnectionManager, user_room
from wsbroadcast.backends.base import backend_from_url
from wsbroadcast.backends.redis import RedisClusterBackend
from wsbroadcast.backends.redis.keys import KeyLayout
from wsbroadcast.envelope import Envelope
from wsbroadcast.exceptions import BackendError, InvalidBackendURL
from wsbroadcast.testing import MemoryTransport

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

Make = Callable[..., RedisClusterBackend]

LAYOUT = KeyLayout("", "", 16)
"""Where rooms go with the default 16 partitions (the slot does not depend on the prefix)."""

WORKER = """
import sys

import anyio

from wsbroadcast import Publisher


async def main() -> None:
    async with Publisher(sys.argv[1]) as publisher:
        envelope = await publisher.send_direct(sys.argv[2], {"from": "a worker"})
        print(envelope.text, flush=True)


anyio.run(main)
"""


async def test_url_selects_the_cluster_backend_lazily(cluster: LocalCluster) -> None:
    backend = backend_from_url(cluster.url + "?partitions=8&history=50&heartbeat=1")
    assert isinstance(backend, RedisClusterBackend)
    assert (backend.partitions, backend.history_size, backend.heartbeat_interval) == (8, 50, 1)
    assert len(backend.startup_nodes) == 6
    tls = backend_from_url("rediss+cluster://user:pw@10.0.0.1:7000,10.0.0.2/")
    assert isinstance(tls, RedisClusterBackend)
    assert tls.url.startswith("rediss://user:pw@10.0.0.1:7000/")
    assert tls.startup_nodes == [("10.0.0.1", 7000), ("10.0.0.2", 6379)]
    with pytest.raises(InvalidBackendURL):
        backend_from_url("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(InvalidBackendURL):
        RedisClusterBackend(cluster.url, prefix="{app}:")


async def test_nodes_with_another_partition_count_are_refused(make_node: Make) -> None:
    with anyio.fail_after(20):
        async with make_node(partitions=16):
            with pytest.raises(InvalidBackendURL, match="partitions=16"):
                async with make_node(partitions=8):
                    pass


async def test_one_order_per_room_across_nodes_and_resume_through_the_other(
    make_node: Make,
) -> None:
    async with ConnectionManager(make_node()) as node_a, ConnectionManager(make_node()) as node_b:
        with anyio.fail_after(20):
            on_a, on_b = MemoryTransport(), MemoryTransport()
            alice = await node_a.connect(on_a, "alice", "lobby")
            await node_b.connect(on_b, "bob", "lobby")

            async def publish(node: ConnectionManager, sender: str) -> None:
                for i in range(30):
                    await node.broadcast("lobby", {"i": i}, sender)

            async with anyio.create_task_group() as group:
                group.start_soon(publish, node_a, "alice")
                group.start_soon(publish, node_b, "bob")
            marker = await node_a.broadcast("lobby", "marker")
            for transport in (on_a, on_b):
                await transport.wait_until(lambda t: marker.text in t.texts)
            # One order: bob's frames are alice's from his own join on, frame for frame.
            start = on_a.texts.index(on_b.texts[0])
            assert on_a.texts[start:] == on_b.texts
            assert audit(on_a.messages(), "lobby") == (len(on_a.texts), 0)
            assert audit(on_b.messages(), "lobby") == (len(on_b.texts), 0)

            # alice drops after her 10th frame and resumes through node b.
            seen = on_a.messages()[9]
            await node_a.disconnect(alice)
            again = MemoryTransport()
            await node_b.connect(again, "alice", "lobby", since=seen["seq"], epoch=seen["epoch"])
            later = await node_a.broadcast("lobby", "later")
            await again.wait_until(lambda t: later.text in t.texts)
            assert again.texts[: len(on_a.texts) - 10] == on_a.texts[10:]
            assert audit(again.messages(), "lobby")[1] == 0


async def test_presence_across_nodes(make_node: Make) -> None:
    async with ConnectionManager(make_node()) as node_a:
        with anyio.fail_after(20):
            watcher = MemoryTransport()
            await node_a.connect(watcher, "carol", "room")
            async with ConnectionManager(make_node()) as node_b:
                await node_a.connect(MemoryTransport(), "alice", "room")
                await node_b.connect(MemoryTransport(), "alice", "room")  # a second tab
                await node_b.connect(MemoryTransport(), "bob", "room")
                for node in (node_a, node_b):
                    assert await node.presence("room") == ["alice", "bob", "carol"]
                await watcher.wait_until(lambda t: len(t.texts) >= 3)
                joins = [m["client_id"] for m in watcher.messages() if m["type"] == "join"]
                assert joins == ["carol", "alice", "bob"]  # alice's second tab: no join
            # node b is gone (its heartbeat removed on exit): a surviving node reaps bob's
            # connection and announces his leave; alice still has her tab on node a.
            await watcher.wait_until(lambda t: any(m["type"] == "leave" for m in t.messages()))
            assert await node_a.presence("room") == ["alice", "carol"]
            leaves = [m["client_id"] for m in watcher.messages() if m["type"] == "leave"]
            assert leaves == ["bob"]


async def test_rooms_on_every_primary_are_all_delivered(
    cluster: LocalCluster, make_node: Make
) -> None:
    rooms = rooms_per_primary(cluster, LAYOUT, (f"room{i}" for i in range(1000)), 2)
    names = [name for names in rooms.values() for name in names]
    assert len(rooms) == 3  # two rooms on each primary
    backend = make_node()
    async with ConnectionManager(backend) as node_a, ConnectionManager(make_node()) as node_b:
        with anyio.fail_after(20):
            transports = {}
            for name in names:
                transports[name] = MemoryTransport()
                await node_a.connect(transports[name], "alice", name)
            sent = {
                name: [await node_b.broadcast(name, i, "bob") for i in range(5)] for name in names
            }
            for name, transport in transports.items():

                def arrived(transport: MemoryTransport, name: str = name) -> bool:
                    return sent[name][-1].text in transport.texts

                await transport.wait_until(arrived)
                assert transport.texts[1:] == [envelope.text for envelope in sent[name]]
            health = backend.health()
            assert health.status == "ok"
            assert health.readers == len({LAYOUT.partition(name) for name in names})


async def test_direct_messages_across_shards(cluster: LocalCluster, make_node: Make) -> None:
    people = rooms_per_primary(cluster, LAYOUT, (f"@user{i}" for i in range(1000)), 1)
    bob, alice = (names[0].removeprefix("@") for names in list(people.values())[:2])
    async with ConnectionManager(make_node()) as node_a, ConnectionManager(make_node()) as node_b:
        with anyio.fail_after(30):
            to_bob, to_alice = MemoryTransport(), MemoryTransport()
            await node_b.connect(to_bob, bob, user_room(bob))
            await node_a.connect(to_alice, alice, user_room(alice))
            sent = await node_a.send_direct(bob, {"text": "hi"}, alice)
            assert isinstance(node_a.backend, RedisClusterBackend)
            prefix = node_a.backend.prefix
            worker = await anyio.run_process(
                [sys.executable, "-c", WORKER, f"{cluster.url}?prefix={prefix}", bob]
            )
            [printed] = worker.stdout.decode().splitlines()
            await to_bob.wait_until(lambda t: printed in t.texts)
            await to_alice.wait_until(lambda t: any(m["type"] == "direct" for m in t.messages()))
            directs = [m for m in to_bob.messages() if m["type"] == "direct"]
            assert [(m["id"], m["client_id"], m["seq"]) for m in directs] == [
                (sent.id, alice, 1), (directs[1]["id"], None, 2),
            ]  # fmt: skip
            [copy] = [m for m in to_alice.messages() if m["type"] == "direct"]
            assert (copy["room"], copy["id"]) == (user_room(alice), sent.id)


async def test_a_primary_killed_mid_stream_never_leaves_a_silent_hole(
    own_cluster: LocalCluster,
) -> None:
    """kill -9 the primary of a busy room while both nodes publish to it; its replica is
    promoted by the cluster's vote. Every client's stream is then gap-free, or explicitly
    reset (``history_lost``), never a silent gap or a seq repeated with other content."""
    make = node_factory(own_cluster, "failover:")
    room = "busy"
    primary = own_cluster.owner(LAYOUT.slot(LAYOUT.partition(room)))
    async with ConnectionManager(make()) as node_a, ConnectionManager(make()) as node_b:
        with anyio.fail_after(45):
            clients = {"alice": (node_a, MemoryTransport()), "bob": (node_b, MemoryTransport())}
            for client_id, (node, transport) in clients.items():
                await node.connect(transport, client_id, room)
            published = {"before": 0, "after": 0}
            phase = "before"
            failed_over = anyio.Event()
            killed = anyio.Event()

            async def publish(node: ConnectionManager, sender: str) -> None:
                while published["after"] < 40:
                    try:
                        await node.broadcast(room, {"by": sender, "phase": phase}, sender)
                    except BackendError:  # BackendUnavailable included: the cluster is failing over
                        await anyio.sleep(0.02)
                        continue
                    published[phase] += 1
                    if published["before"] >= 40 and not killed.is_set():
                        killed.set()
                    await anyio.sleep(0.002)

            async with anyio.create_task_group() as group:
                group.start_soon(publish, node_a, "alice")
                group.start_soon(publish, node_b, "bob")
                await killed.wait()
                own_cluster.kill(primary)
                await anyio.to_thread.run_sync(own_cluster.wait_failover, primary, 20.0)
                phase = "after"
                failed_over.set()
            assert own_cluster.owner(LAYOUT.slot(LAYOUT.partition(room))) != primary
            # Had replication lagged, a node that delivered lost envelopes may check the room
            # only now, dropping with the old epoch what was published meanwhile (told as
            # history_lost): a marker lost that way is followed by another, until every
            # client has one (bounded by the test's deadline).
            for attempt in range(20):
                text = (await node_a.broadcast(room, f"marker {attempt}")).text
                with anyio.move_on_after(3):
                    for _, transport in clients.values():

                        def arrived(transport: MemoryTransport, text: str = text) -> bool:
                            return text in transport.texts

                        await transport.wait_until(arrived)
                    break
            else:
                pytest.fail("no marker reached every client")
            for client_id, (_, transport) in clients.items():
                envelopes, _resets = audit(transport.messages(), room)
                assert envelopes >= 80, client_id
            # A client resuming from before the kill gets the rest exactly, or history_lost.
            seen = clients["alice"][1].messages()[20]
            again = MemoryTransport()
            await node_b.connect(again, "carol", room, since=seen["seq"], epoch=seen["epoch"])
            after = await node_a.broadcast(room, "after resume")
            await again.wait_until(lambda t: after.text in t.texts)
            audit([seen, *again.messages()], room)


async def test_writes_a_promoted_replica_never_got_are_told_as_history_lost(
    own_cluster: LocalCluster,
) -> None:
    """Acknowledged writes lost in a failover: the primary's link to its replica is cut, a
    few envelopes are published and delivered, then the primary is killed -9. The promoted
    replica never had them: every client that saw them is told ``history_lost``, and no
    client holds an envelope that the stream now holds with other content."""
    make = node_factory(own_cluster, "lost:")
    room = "busy"
    primary = own_cluster.owner(LAYOUT.slot(LAYOUT.partition(room)))
    async with ConnectionManager(make()) as node_a, ConnectionManager(make()) as node_b:
        with anyio.fail_after(45):
            clients = {"alice": (node_a, MemoryTransport()), "bob": (node_b, MemoryTransport())}
            for client_id, (node, transport) in clients.items():
                await node.connect(transport, client_id, room)
            for i in range(5):
                await node_a.broadcast(room, i, "alice")
            # The replica is frozen and its link cut: what is published now reaches only the
            # primary, which is killed before the replica can reconnect.
            replica = own_cluster.replica_of(primary)
            own_cluster.freeze(replica)
            try:
                await anyio.to_thread.run_sync(
                    command, primary, "CLIENT", "KILL", "TYPE", "replica"
                )
                unreplicated = [
                    await node_a.broadcast(room, f"lost {i}", "alice") for i in range(3)
                ]
                for _, transport in clients.values():
                    await transport.wait_until(lambda t: unreplicated[-1].text in t.texts)
                own_cluster.kill(primary)
            finally:
                own_cluster.thaw(replica)
            await anyio.to_thread.run_sync(own_cluster.wait_failover, primary, 20.0)
            # Both nodes must have checked the room first: until the node that delivered
            # the lost envelopes checks it, what is published lands in the old epoch, and
            # that check then moves the room to a new one, dropping it (told as history_lost
            # to everyone; docs/backends.md, "Redis Cluster"): a marker published in that
            # window reaches only some clients.
            for _, transport in clients.values():
                await transport.wait_until(
                    lambda t: any(m["type"] == "history_lost" for m in t.messages())
                )
            after: list[Envelope] = []
            while len(after) < 5:
                try:
                    after.append(await node_b.broadcast(room, "after", "bob"))
                except BackendError:
                    await anyio.sleep(0.05)
            marker = await node_a.broadcast(room, "marker")
            for _, transport in clients.values():
                await transport.wait_until(lambda t: marker.text in t.texts)
            final = await node_a.backend.history(room, 0)
            assert final.complete
            held = {envelope.seq: envelope.text for envelope in final.envelopes}
            for client_id, (_, transport) in clients.items():
                _, resets = audit(transport.messages(), room)
                for frame, message in zip(transport.texts, transport.messages(), strict=True):
                    if message.get("epoch") == final.epoch and message["seq"] in held:
                        assert held[message["seq"]] == frame, (client_id, message)
                assert resets >= 1, client_id  # every client saw envelopes that are gone
            assert final.epoch != unreplicated[0].epoch
            # In the new stream (presence's resync may announce joins and leaves after it).
            assert held[marker.seq] == marker.text


async def test_a_burst_past_the_connection_limit_waits_instead_of_failing(make_node: Make) -> None:
    """redis-py's cluster pools raise when every connection is in use; the backend queues
    its commands for a connection instead, as one Redis's blocking pool does, so a burst of
    connects is slower, never an outage."""
    async with make_node(max_connections=2) as node:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                for n in range(40):
                    group.start_soon(node.add_presence, f"burst-{n % 5}", f"c{n}")
                    group.start_soon(node.publish, f"burst-{n % 5}", "message", f"c{n}", n)
        for room in range(5):
            history = await node.history(f"burst-{room}", 0)
            assert [e.seq for e in history.envelopes] == list(range(1, 9))
        assert node.health().status == "ok"
