from __future__ import annotations

import subprocess
import sys
from typing import Any

import anyio
import pytest

from tests.faults import stall_one_of_two
from wsbroadcast import (
    AlreadyJoined,
    BackendUnavailable,
    CloseCode,
    Connection,
    ConnectionManager,
    ConnectionState,
    InvalidData,
    InvalidInput,
    InvalidName,
    ManagerNotRunning,
    NotJoined,
    SlowConsumerPolicy,
)
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.envelope import Draft, Envelope
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio


def kinds(transport: MemoryTransport) -> list[tuple[str, str, int]]:
    return [(e["type"], e["client_id"], e["seq"]) for e in transport.envelopes()]


async def test_connect_announces_join_to_everyone_including_the_joiner(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    await manager.connect(alice, "alice")
    await manager.connect(bob, "bob")
    await alice.wait_for_messages(2)
    await bob.wait_for_messages(1)
    assert alice.accepted
    assert bob.accepted
    assert kinds(alice) == [("join", "alice", 1), ("join", "bob", 2)]
    assert kinds(bob) == [("join", "bob", 2)]
    assert await manager.presence("lobby") == ["alice", "bob"]


async def test_broadcast_reaches_every_member_with_server_fields(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    await manager.connect(alice, "alice")
    await manager.connect(bob, "bob")
    envelope = await manager.broadcast("lobby", {"message": "hi"}, "alice")
    assert envelope.seq == 3
    await alice.wait_for_messages(3)
    await bob.wait_for_messages(2)
    assert alice.texts[-1] == bob.texts[-1] == envelope.text
    received = bob.envelopes()[-1]
    assert received["client_id"] == "alice"
    assert received["data"] == {"message": "hi"}
    assert received["timestamp"].endswith("+00:00")


async def test_rooms_are_isolated(manager: ConnectionManager) -> None:
    red, blue = MemoryTransport(), MemoryTransport()
    await manager.connect(red, "r", room="red")
    await manager.connect(blue, "b", room="blue")
    await manager.broadcast("red", "only red", "r")
    await manager.broadcast("blue", "only blue", "b")
    await red.wait_for_messages(2)
    await blue.wait_for_messages(2)
    assert [e["data"] for e in red.envelopes()] == [None, "only red"]
    assert [e["data"] for e in blue.envelopes()] == [None, "only blue"]
    assert [e["seq"] for e in red.envelopes()] == [1, 2]
    assert [e["seq"] for e in blue.envelopes()] == [1, 2]


async def test_disconnect_announces_leave_and_is_idempotent(manager: ConnectionManager) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    connection = await manager.connect(alice, "alice")
    await manager.connect(bob, "bob")
    await manager.disconnect(connection)
    await manager.disconnect(connection)
    assert connection.state is ConnectionState.CLOSED
    assert alice.close_code == CloseCode.NORMAL
    await bob.wait_for_messages(2)
    assert kinds(bob) == [("join", "bob", 2), ("leave", "alice", 3)]
    assert await manager.presence("lobby") == ["bob"]
    assert manager.statistics().connections == 1


async def test_second_tab_of_a_client_joins_and_leaves_once(manager: ConnectionManager) -> None:
    watcher = MemoryTransport()
    await manager.connect(watcher, "watcher")
    tab1 = await manager.connect(MemoryTransport(), "alice")
    tab2 = await manager.connect(MemoryTransport(), "alice")
    assert await manager.presence("lobby") == ["alice", "watcher"]
    await manager.disconnect(tab1)
    assert await manager.presence("lobby") == ["alice", "watcher"]
    await manager.disconnect(tab2)
    assert await manager.presence("lobby") == ["watcher"]
    await watcher.wait_for_messages(3)
    assert kinds(watcher) == [
        ("join", "watcher", 1),
        ("join", "alice", 2),
        ("leave", "alice", 3),
    ]


async def test_a_dead_socket_is_removed_without_disturbing_others(
    manager: ConnectionManager,
) -> None:
    dead = MemoryTransport(fail_after=1)
    healthy = MemoryTransport()
    dead_connection = await manager.connect(dead, "dead")
    await manager.connect(healthy, "healthy")
    for n in range(5):
        await manager.broadcast("lobby", n, "healthy")
    await dead_connection.wait_closed()
    await healthy.wait_until(lambda t: any(e["type"] == "leave" for e in t.envelopes()))
    assert [e["data"] for e in healthy.envelopes() if e["type"] == "message"] == list(range(5))
    assert await manager.presence("lobby") == ["healthy"]
    stats = manager.statistics()
    assert stats.send_failures == 1
    assert stats.connections == 1


async def test_disconnect_of_an_already_dead_socket_never_raises(
    manager: ConnectionManager,
) -> None:
    transport = MemoryTransport(fail_after=0)
    connection = await manager.connect(transport, "ghost")
    await connection.wait_closed()
    await manager.disconnect(connection)
    assert connection.state is ConnectionState.CLOSED


@pytest.mark.parametrize("manager_queue_size", [8])
async def test_a_stalled_client_never_delays_a_broadcast_and_is_disconnected(
    manager: ConnectionManager,
) -> None:
    stalled, healthy, stalled_connection = await stall_one_of_two(manager)
    assert stalled.close_code == CloseCode.SLOW_CONSUMER
    assert stalled_connection.overflowed
    assert [e["data"] for e in healthy.envelopes() if e["type"] == "message"] == list(range(20))
    stats = manager.statistics()
    assert stats.slow_consumer_disconnects == 1
    assert stats.dropped >= 8


async def test_drop_oldest_keeps_the_connection_and_shows_a_gap() -> None:
    async with ConnectionManager(queue_size=4, slow_consumer="drop_oldest") as manager:
        slow = MemoryTransport()
        connection = await manager.connect(slow, "slow")
        await slow.wait_for_messages(1)
        slow.pause()
        # The writer takes the first frame and blocks on it; the queue then holds 4.
        for n in range(10):
            await manager.broadcast("lobby", n, "other")
        slow.resume()
        await slow.wait_until(lambda t: any(e["data"] == 9 for e in t.envelopes()))
        seqs = [e["seq"] for e in slow.envelopes()]
        assert seqs == sorted(seqs)
        assert len(seqs) < 11
        assert seqs[-4:] == [8, 9, 10, 11]
        assert connection.state is ConnectionState.OPEN
        assert connection.statistics().dropped == 11 - len(seqs)


async def test_resume_delivers_exactly_the_missing_suffix(manager: ConnectionManager) -> None:
    await manager.connect(MemoryTransport(), "alice")
    for n in range(5):
        await manager.broadcast("lobby", n, "alice")
    late = MemoryTransport()
    await manager.connect(late, "bob", since=3)
    await late.wait_for_messages(4)
    # seq 4..6 are messages 2..4; seq 7 is bob's own join, delivered once.
    assert [e["seq"] for e in late.envelopes()] == [4, 5, 6, 7]
    await manager.broadcast("lobby", "live", "alice")
    await late.wait_for_messages(5)
    assert [e["seq"] for e in late.envelopes()] == [4, 5, 6, 7, 8]


async def test_resume_beyond_history_says_so_before_the_live_stream() -> None:
    async with ConnectionManager(MemoryBackend(history_size=3)) as manager:
        await manager.connect(MemoryTransport(), "alice")
        for n in range(10):
            await manager.broadcast("lobby", n, "alice")
        late = MemoryTransport()
        await manager.connect(late, "bob", since=2)
        await late.wait_for_messages(2)
        first, second = late.messages()[:2]
        assert first == {
            "type": "history_lost",
            "room": "lobby",
            "data": {"since": 2, "epoch": second["epoch"], "first_seq": 10, "last_seq": 12},
        }
        assert (second["type"], second["seq"]) == ("join", 12)


async def test_resume_from_a_future_seq_is_reported_as_lost(manager: ConnectionManager) -> None:
    late = MemoryTransport()
    await manager.connect(late, "bob", since=99)
    await late.wait_for_messages(2)
    assert late.messages()[0]["type"] == "history_lost"
    assert late.envelopes()[0]["seq"] == 1


async def test_shutdown_closes_every_connection_with_going_away() -> None:
    transports = [MemoryTransport() for _ in range(3)]
    stalled = MemoryTransport()
    stalled.pause()
    async with ConnectionManager() as manager:
        connections = [await manager.connect(t, f"c{i}") for i, t in enumerate(transports)]
        connections.append(await manager.connect(stalled, "stalled"))
    assert all(c.state is ConnectionState.CLOSED for c in connections)
    assert [t.close_code for t in transports] == [CloseCode.GOING_AWAY] * 3
    assert stalled.close_code == CloseCode.GOING_AWAY


async def test_manager_refuses_use_outside_its_block() -> None:
    manager = ConnectionManager()
    with pytest.raises(ManagerNotRunning):
        await manager.broadcast("lobby", "x", "alice")
    async with manager:
        pass
    with pytest.raises(ManagerNotRunning):
        await manager.connect(MemoryTransport(), "alice")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("room", ""),
        ("room", "x" * 65),
        ("room", "a b"),
        ("room", "é"),
        ("room", "a/b"),
        ("client_id", ""),
        ("client_id", "<script>"),
        ("client_id", 42),
        ("type", "with space"),
    ],
)
async def test_bad_names_are_refused_and_publish_nothing(
    manager: ConnectionManager, field: str, value: Any
) -> None:
    watcher = MemoryTransport()
    await manager.connect(watcher, "watcher")
    args: dict[str, Any] = {"room": "lobby", "client_id": "alice", "type": "message"}
    args[field] = value
    with pytest.raises(InvalidName) as caught:
        await manager.broadcast(args["room"], "x", args["client_id"], type=args["type"])
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    await manager.broadcast("lobby", "after", "watcher")
    await watcher.wait_for_messages(2)
    assert [e["seq"] for e in watcher.envelopes()] == [1, 2]


@pytest.mark.parametrize(
    "data",
    [float("nan"), float("inf"), {1: "int key"}, {"set": {1, 2}}, object(), b"bytes", (1, 2)],
)
async def test_non_json_data_is_refused_and_publishes_nothing(
    manager: ConnectionManager, data: Any
) -> None:
    with pytest.raises(InvalidData):
        await manager.broadcast("lobby", data, "alice")
    envelope = await manager.broadcast("lobby", "fine", "alice")
    assert envelope.seq == 1


@pytest.mark.parametrize("type_", ["error", "history_lost", "presence"])
async def test_reserved_types_are_refused(manager: ConnectionManager, type_: str) -> None:
    with pytest.raises(InvalidInput):
        await manager.broadcast("lobby", None, "alice", type=type_)


async def test_bad_connect_arguments_are_refused_before_accepting(
    manager: ConnectionManager,
) -> None:
    transport = MemoryTransport()
    with pytest.raises(InvalidName):
        await manager.connect(transport, "bad id")
    with pytest.raises(InvalidName):
        await manager.connect(transport, "ok", room="")
    with pytest.raises(InvalidInput):
        await manager.connect(transport, "ok", since=-1)
    assert not transport.accepted
    assert manager.statistics().connections == 0


async def test_error_and_control_frames_go_to_one_client_unsequenced(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    connection = await manager.connect(alice, "alice")
    await manager.connect(bob, "bob")
    assert connection.send_error("invalid_json", "not JSON")
    await alice.wait_for_messages(3)
    assert alice.messages()[-1] == {
        "type": "error",
        "room": "lobby",
        "data": {"code": "invalid_json", "detail": "not JSON"},
    }
    await manager.broadcast("lobby", "x", "bob")
    await bob.wait_for_messages(2)
    assert all(message["type"] != "error" for message in bob.messages())
    await manager.disconnect(connection)
    assert not connection.send_error("late", "closed")


async def test_idle_rooms_release_their_backend_subscription() -> None:
    backend = MemoryBackend()
    async with ConnectionManager(backend) as manager:
        connection = await manager.connect(MemoryTransport(), "alice", room="temp")
        assert len(backend._rooms["temp"].listeners) == 1
        assert manager.statistics().rooms == 1
        await manager.disconnect(connection)
        assert backend._rooms["temp"].listeners == []
        assert manager.statistics().rooms == 0


async def test_concurrent_connects_to_a_new_room_share_one_subscription() -> None:
    backend = MemoryBackend()
    async with ConnectionManager(backend) as manager:
        transports = [MemoryTransport() for _ in range(10)]
        async with anyio.create_task_group() as group:
            for i, transport in enumerate(transports):
                group.start_soon(manager.connect, transport, f"c{i}", "new")
        assert len(backend._rooms["new"].listeners) == 1
        await manager.broadcast("new", "hello", "c0")
        for transport in transports:
            await transport.wait_until(lambda t: any(e["data"] == "hello" for e in t.envelopes()))


def test_constructor_refuses_bad_settings() -> None:
    with pytest.raises(InvalidInput):
        ConnectionManager(queue_size=0)
    with pytest.raises(InvalidInput):
        ConnectionManager(slow_consumer="ignore")
    with pytest.raises(InvalidInput):
        ConnectionManager(close_timeout=0)
    with pytest.raises(InvalidInput, match="queue_bytes"):
        ConnectionManager(queue_bytes=0)
    assert ConnectionManager(slow_consumer="drop_oldest").slow_consumer is (
        SlowConsumerPolicy.DROP_OLDEST
    )


async def test_a_manager_is_entered_once(manager: ConnectionManager) -> None:
    with pytest.raises(RuntimeError, match="entered once"):
        await manager.__aenter__()
    await manager.connect(MemoryTransport(), "alice")  # the running manager is unharmed
    assert await manager.presence("lobby") == ["alice"]


async def test_joining_and_leaving_rooms_are_checked_against_the_connection(
    manager: ConnectionManager,
) -> None:
    transport = MemoryTransport()
    connection = await manager.connect(transport, "alice")
    with pytest.raises(AlreadyJoined):
        await manager.join(connection, "lobby")
    with pytest.raises(NotJoined):
        await manager.leave(connection, "red")
    await manager.join(connection, "red")
    connection.queue.abort(CloseCode.GOING_AWAY, "closing")  # as a shutdown or overflow does
    await manager.join(connection, "blue")  # closing: nothing to join, no error
    await manager.leave(connection, "red")  # closing: nothing to leave, no error
    await connection.wait_closed()
    assert connection.rooms == frozenset({"lobby", "red"})
    assert not any(m["type"] == "left" for m in transport.messages())
    assert await manager.presence("blue") == []


async def test_a_socket_that_dies_during_the_history_replay_is_returned_closed(
    manager: ConnectionManager,
) -> None:
    for n in range(3):
        await manager.broadcast("lobby", n, "alice")
    dead = MemoryTransport(fail_after=1)
    connection = await manager.connect(dead, "bob", since=0)
    await connection.wait_closed()
    assert connection.close_code == CloseCode.GOING_AWAY
    assert connection.close_reason == "send failed: TransportClosed"
    assert len(dead.texts) == 1
    assert manager.statistics().send_failures == 1
    assert await manager.presence("lobby") == []


def test_the_core_imports_no_web_framework_or_broker_client() -> None:
    code = (
        "import sys, wsbroadcast, wsbroadcast.testing, wsbroadcast.backends.memory\n"
        "import wsbroadcast.backends, wsbroadcast.transports, wsbroadcast.control\n"
        "wsbroadcast.backend_from_url('memory://')\n"
        "bad = {'starlette', 'websockets', 'redis', 'uvicorn', 'fastapi',\n"
        "    'wsbroadcast.backends.redis', 'wsbroadcast.transports.starlette',\n"
        "    'wsbroadcast.transports.uvicorn', 'wsbroadcast.transports.websockets'}\n"
        "print(sorted(bad & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


class FlakyBackend(MemoryBackend):
    """A memory backend whose next operations can be made to fail, as a broker outage would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_add_presence = False
        self.fail_publish = False

    async def add_presence(self, room: str, client_id: str) -> bool:
        if self.fail_add_presence:
            raise BackendUnavailable("presence store unreachable")
        return await super().add_presence(room, client_id)

    async def publish_draft(self, draft: Draft) -> Envelope:
        if self.fail_publish:
            raise BackendUnavailable("broker unreachable")
        return await super().publish_draft(draft)


async def test_a_failed_connect_leaves_the_clients_other_tabs_present() -> None:
    backend = FlakyBackend()
    async with ConnectionManager(backend) as manager:
        watcher = MemoryTransport()
        await manager.connect(watcher, "watcher")
        await manager.connect(MemoryTransport(), "alice")
        backend.fail_add_presence = True
        refused = MemoryTransport()
        with pytest.raises(BackendUnavailable):
            await manager.connect(refused, "alice")
        assert refused.close_code == CloseCode.INTERNAL_ERROR
        backend.fail_add_presence = False
        assert await manager.presence("lobby") == ["alice", "watcher"]
        await manager.broadcast("lobby", "still here", "watcher")
        await watcher.wait_until(lambda t: t.envelopes()[-1]["data"] == "still here")
        assert [e["type"] for e in watcher.envelopes()] == ["join", "join", "message"]
        assert manager.statistics().connections == 2


async def test_a_broadcast_the_backend_refuses_raises_and_delivers_nothing() -> None:
    backend = FlakyBackend()
    async with ConnectionManager(backend) as manager:
        watcher = MemoryTransport()
        await manager.connect(watcher, "watcher")
        backend.fail_publish = True
        with pytest.raises(BackendUnavailable):
            await manager.broadcast("lobby", "lost?", "watcher")
        backend.fail_publish = False
        envelope = await manager.broadcast("lobby", "next", "watcher")
        assert envelope.seq == 2
        await watcher.wait_for_messages(2)
        assert [e["data"] for e in watcher.envelopes()] == [None, "next"]


# -- A connection's life through the manager: who writes to its socket, when, and how its
# closing reaches the app (moved from test_connection.py, which tests Connection itself)

IDLE = 40


def saw_leave(transport: MemoryTransport) -> bool:
    """Whether a ``leave`` has arrived (checked before the first frame too)."""
    return any(envelope["type"] == "leave" for envelope in transport.envelopes())


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
@pytest.mark.parametrize("manager_queue_size", [8])
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
