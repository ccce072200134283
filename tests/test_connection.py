"""A connection's life: who writes to its socket, when, and how its closing reaches the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from wsbroadcast import CloseCode, Connection, ConnectionManager, ConnectionState
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio

IDLE = 40


def saw_leave(transport: MemoryTransport) -> bool:
    """Whether a ``leave`` has arrived (checked before the first frame too)."""
    return any(envelope["type"] == "leave" for envelope in transport.envelopes())


@pytest.fixture
async def manager() -> AsyncIterator[ConnectionManager]:
    async with ConnectionManager(queue_size=8) as manager:
        yield manager


async def test_idle_connections_on_a_nowait_transport_hold_no_task(
    manager: ConnectionManager,
) -> None:
    before = len(anyio.get_running_tasks())
    transports = [MemoryBatchTransport() for _ in range(IDLE)]
    for i, transport in enumerate(transports):
        await manager.connect(transport, f"c{i}")
    await manager.broadcast("lobby", {"message": "hi"}, "c0")
    for transport in transports:
        await transport.wait_until(lambda t: any(m["type"] == "message" for m in t.messages()))
    # Everything was written by the manager's one flusher: no task per connection.
    assert len(anyio.get_running_tasks()) - before < IDLE // 4


async def test_idle_connections_on_other_transports_have_a_writer_each(
    manager: ConnectionManager,
) -> None:
    before = len(anyio.get_running_tasks())
    for i in range(IDLE):
        await manager.connect(MemoryTransport(), f"c{i}")
    assert len(anyio.get_running_tasks()) - before >= IDLE


async def test_a_full_socket_gets_a_writer_until_it_drains_then_the_flusher_again(
    manager: ConnectionManager,
) -> None:
    slow, fast = MemoryBatchTransport(), MemoryBatchTransport()
    connection = await manager.connect(slow, "slow")
    await manager.connect(fast, "fast")
    slow.pause()
    before = len(anyio.get_running_tasks())
    for i in range(5):
        await manager.broadcast("lobby", {"message": i}, "fast")
    await fast.wait_until(lambda t: len(t.envelopes()) == 6)
    await anyio.wait_all_tasks_blocked()
    # The paused socket refused the no-wait write: one writer task now waits on it.
    assert len(anyio.get_running_tasks()) == before + 1
    slow.resume()
    await slow.wait_until(lambda t: len(t.envelopes()) == 7)
    await manager.broadcast("lobby", {"message": "after"}, "fast")
    await slow.wait_until(lambda t: len(t.envelopes()) == 8)
    assert [e["seq"] for e in slow.envelopes()] == list(range(1, 9))
    assert connection.state is ConnectionState.OPEN
    assert connection.statistics().queued == 0
    assert connection.statistics().delivered == 8


@pytest.mark.parametrize("kind", [MemoryTransport, MemoryBatchTransport])
async def test_disconnecting_an_idle_connection_closes_it_and_announces_leave(
    manager: ConnectionManager, kind: type[MemoryTransport]
) -> None:
    alice, bob = kind(), kind()
    connection = await manager.connect(alice, "alice")
    await manager.connect(bob, "bob")
    await manager.disconnect(connection, CloseCode.POLICY_VIOLATION, "bye")
    assert connection.state is ConnectionState.CLOSED
    assert (alice.close_code, alice.close_reason) == (CloseCode.POLICY_VIOLATION, "bye")
    await bob.wait_until(saw_leave)
    assert await manager.presence("lobby") == ["bob"]


async def test_shutdown_closes_idle_nowait_connections_with_going_away() -> None:
    transports = [MemoryBatchTransport() for _ in range(3)]
    async with ConnectionManager() as manager:
        connections = [await manager.connect(t, f"c{i}") for i, t in enumerate(transports)]
    assert all(c.state is ConnectionState.CLOSED for c in connections)
    assert {t.close_code for t in transports} == {CloseCode.GOING_AWAY}


async def test_a_dead_socket_found_by_the_flusher_is_closed(manager: ConnectionManager) -> None:
    dead, alive = MemoryBatchTransport(fail_after=1), MemoryBatchTransport()
    connection = await manager.connect(dead, "dead")
    await manager.connect(alive, "alive")
    await manager.broadcast("lobby", {"message": "hi"}, "alive")
    await connection.wait_closed()
    assert manager.statistics().send_failures == 1
    await alive.wait_until(saw_leave)


@pytest.mark.parametrize("kind", [MemoryTransport, MemoryBatchTransport])
async def test_cancel_on_close_stops_the_receiver_when_the_queue_overflows(
    manager: ConnectionManager, kind: type[MemoryTransport]
) -> None:
    stalled = kind()
    connection = await manager.connect(stalled, "stalled")
    stalled.pause()
    receiving = anyio.Event()
    stopped: list[ConnectionState] = []

    async def receiver() -> None:
        with connection.cancel_on_close() as scope:
            receiving.set()
            await anyio.sleep_forever()
        assert scope.cancelled_caught
        stopped.append(connection.state)

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(receiver)
        await receiving.wait()
        for i in range(20):
            await manager.broadcast("lobby", {"message": i}, "other")
    assert stopped == [ConnectionState.CLOSING] or stopped == [ConnectionState.CLOSED]
    assert connection.close_code == CloseCode.SLOW_CONSUMER
    stalled.resume()
    await connection.wait_closed()


async def test_cancel_on_close_of_a_closed_connection_cancels_at_once(
    manager: ConnectionManager,
) -> None:
    connection = await manager.connect(MemoryBatchTransport(), "alice")
    await manager.disconnect(connection)
    with connection.cancel_on_close() as scope:
        await anyio.sleep_forever()
    assert scope.cancelled_caught


async def test_cancel_on_close_leaves_a_normal_exit_alone(manager: ConnectionManager) -> None:
    connection = await manager.connect(MemoryBatchTransport(), "alice")
    with connection.cancel_on_close() as scope:
        await anyio.lowlevel.checkpoint()
    assert not scope.cancel_called
    await manager.disconnect(connection)
    assert not scope.cancel_called  # it was exited: closing later does not touch it


async def test_session_disconnects_and_announces_leave_on_exit(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryBatchTransport(), MemoryBatchTransport()
    await manager.connect(bob, "bob")
    seen: list[Connection] = []

    async def client() -> None:
        async with manager.session(alice, "alice") as connection:
            seen.append(connection)
            raise LookupError("the application's own error passes through")

    with pytest.raises(LookupError):
        await client()
    [connection] = seen
    assert connection.state is ConnectionState.CLOSED
    assert alice.close_code == CloseCode.NORMAL
    await bob.wait_until(saw_leave)


async def test_session_body_is_cancelled_by_shutdown() -> None:
    transport = MemoryTransport()
    reached_end = False

    async def client(manager: ConnectionManager) -> None:
        nonlocal reached_end
        async with manager.session(transport, "alice"):
            await anyio.sleep_forever()
        reached_end = True

    async with anyio.create_task_group() as task_group, ConnectionManager() as manager:
        task_group.start_soon(client, manager)
        await transport.wait_for_messages(1)
    assert reached_end
    assert transport.close_code == CloseCode.GOING_AWAY


async def test_frames_being_written_when_the_socket_dies_count_as_dropped(
    manager: ConnectionManager,
) -> None:
    slow = MemoryTransport()
    connection = await manager.connect(slow, "slow")
    await slow.wait_for_messages(1)
    slow.pause()
    for i in range(3):
        await manager.broadcast("lobby", {"message": i}, "other")
    await manager.disconnect(connection)
    stats = connection.statistics()
    assert stats.delivered == 1
    assert stats.dropped == 3
    assert stats.queued == 0
