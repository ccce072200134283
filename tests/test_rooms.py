"""Several rooms per connection and direct messages: ConnectionManager.join, leave, send_direct."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults import CheckpointBackend, CheckpointCancel
from wsbroadcast import (
    AlreadyJoined,
    BackendUnavailable,
    CloseCode,
    ConnectionManager,
    ConnectionState,
    Forbidden,
    InvalidInput,
    InvalidName,
    NotJoined,
    user_room,
)
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio
GUARD = 5.0


def of_room(transport: MemoryTransport, room: str) -> list[dict[str, Any]]:
    return [m for m in transport.messages() if m["room"] == room]


def seqs(transport: MemoryTransport, room: str) -> list[int]:
    return [m["seq"] for m in of_room(transport, room) if "seq" in m]


def acks(transport: MemoryTransport, type: str) -> list[dict[str, Any]]:
    return [m for m in transport.messages() if m["type"] == type and "seq" not in m]


def last_data(transport: MemoryTransport) -> Any:
    envelopes = transport.envelopes()
    return envelopes[-1]["data"] if envelopes else None


async def until(transport: MemoryTransport, predicate: Callable[[MemoryTransport], bool]) -> None:
    with anyio.fail_after(GUARD):
        await transport.wait_until(predicate)


async def acked(transport: MemoryTransport, type: str, room: str) -> dict[str, Any]:
    await until(transport, lambda t: any(a["room"] == room for a in acks(t, type)))
    return next(a for a in acks(transport, type) if a["room"] == room)


# -- joining and leaving while open


async def test_join_adds_a_room_with_its_own_gap_free_seqs_in_one_order_of_arrival(
    manager: ConnectionManager,
) -> None:
    alice = MemoryTransport()
    connection = await manager.connect(alice, "alice", "lobby")
    await manager.join(connection, "red")
    assert connection.rooms == {"lobby", "red"}
    assert connection.in_room("red")
    assert not connection.in_room("blue")
    sent = []
    for n in range(6):
        room = "red" if n % 2 else "lobby"
        sent.append((room, (await manager.broadcast(room, n, "bob")).seq))
    await until(alice, lambda t: len(t.envelopes()) == 2 + 6)
    # Both joins, then every broadcast in the order published, each room counting from 1.
    received = [(e["room"], e["seq"]) for e in alice.envelopes()]
    assert received == [("lobby", 1), ("red", 1), *sent]
    assert seqs(alice, "red") == [1, 2, 3, 4]
    assert seqs(alice, "lobby") == [1, 2, 3, 4]
    assert await manager.presence("red") == ["alice"]


async def test_joined_says_where_a_client_without_since_starts(manager: ConnectionManager) -> None:
    first, second = MemoryTransport(), MemoryTransport()
    one = await manager.connect(first, "alice", "lobby")
    await manager.join(one, "red")
    for n in range(3):
        await manager.broadcast("red", n)
    # A second tab of alice: no join is announced, so the ack carries the stream's position.
    two = await manager.connect(second, "alice", "lobby")
    await manager.join(two, "red")
    joined = await acked(second, "joined", "red")
    last = await manager.broadcast("red", "after")
    assert joined["data"] == {"seq": 4, "epoch": last.epoch}
    await until(second, lambda t: seqs(t, "red") == [5])
    # A first arrival: the ack comes just before its own join envelope.
    carol = MemoryTransport()
    three = await manager.connect(carol, "carol", "lobby")
    await manager.join(three, "red")
    await until(carol, lambda t: seqs(t, "red") == [6])
    assert (await acked(carol, "joined", "red"))["data"] == {"seq": 5, "epoch": last.epoch}
    kinds = [(m["type"], m.get("seq")) for m in of_room(carol, "red")]
    assert kinds == [("joined", None), ("join", 6)]


async def test_join_with_since_replays_history_then_acks_then_goes_live(
    manager: ConnectionManager,
) -> None:
    watcher = MemoryTransport()
    await manager.connect(watcher, "watcher", "red")
    for n in range(5):
        await manager.broadcast("red", n)
    alice = MemoryTransport()
    connection = await manager.connect(alice, "alice", "lobby")
    epoch = (await manager.broadcast("red", "sixth")).epoch
    await manager.join(connection, "red", since=3, epoch=epoch)
    await manager.broadcast("red", "live")
    await until(alice, lambda t: seqs(t, "red")[-1:] == [9])
    red = [(m["type"], m.get("seq")) for m in of_room(alice, "red")]
    assert red == [
        ("message", 4), ("message", 5), ("message", 6), ("message", 7), ("join", 8),
        ("joined", None), ("message", 9),
    ]  # fmt: skip
    assert (await acked(alice, "joined", "red"))["data"] == {"seq": 8, "epoch": epoch}


async def test_join_from_another_epoch_gets_history_lost_then_the_ack(
    manager: ConnectionManager,
) -> None:
    await manager.broadcast("red", "one")
    alice = MemoryTransport()
    connection = await manager.connect(alice, "alice", "lobby")
    await manager.join(connection, "red", since=1, epoch="gone")
    lost = await acked(alice, "history_lost", "red")
    joined = await acked(alice, "joined", "red")
    assert lost["data"]["since"] == 1
    assert lost["data"]["epoch"] == joined["data"]["epoch"]
    assert joined["data"]["seq"] == 1  # just before alice's own join (seq 2)
    await until(alice, lambda t: seqs(t, "red") == [2])


@pytest.mark.parametrize("transport_class", [MemoryTransport, MemoryBatchTransport])
@pytest.mark.parametrize("manager_queue_size", [4])
async def test_a_history_larger_than_the_queue_waits_for_the_client_not_disconnects(
    manager: ConnectionManager,
    transport_class: type[MemoryTransport],
) -> None:
    for n in range(40):
        await manager.broadcast("red", n)
    alice = transport_class(turns_per_send=1)
    connection = await manager.connect(alice, "alice", "lobby")
    await manager.join(connection, "red", since=0)
    await until(alice, lambda t: bool(acks(t, "joined")))
    assert seqs(alice, "red") == list(range(1, 42))
    assert connection.state is ConnectionState.OPEN
    assert manager.statistics().slow_consumer_disconnects == 0


async def test_leave_acks_drops_the_rest_of_the_room_and_announces_the_departure(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    mine = await manager.connect(alice, "alice", "lobby")
    theirs = await manager.connect(bob, "bob", "lobby")
    await manager.join(mine, "red")
    await manager.join(theirs, "red")
    await until(alice, lambda t: seqs(t, "red") == [1, 2])
    await manager.leave(mine, "red")
    assert mine.rooms == {"lobby"}
    await manager.broadcast("red", "not for alice")
    await manager.broadcast("lobby", "for alice")
    await until(alice, lambda t: last_data(t) == "for alice")
    red = [(m["type"], m.get("client_id")) for m in of_room(alice, "red")]
    assert red == [("joined", None), ("join", "alice"), ("join", "bob"), ("left", None)]
    await until(bob, lambda t: any(e["type"] == "leave" for e in t.envelopes()))
    assert await manager.presence("red") == ["bob"]
    with pytest.raises(NotJoined):
        await manager.leave(mine, "red")
    # Leaving the first room is allowed too; rejoining works and counts on from there.
    await manager.leave(mine, "lobby")
    await manager.join(mine, "red")
    assert mine.rooms == {"red"}


async def test_refused_joins_change_nothing_and_the_connection_goes_on(
    manager: ConnectionManager,
) -> None:
    alice = MemoryTransport()
    connection = await manager.connect(alice, "alice", "lobby")
    await until(alice, lambda t: len(t.texts) == 1)
    refusals: list[tuple[str, dict[str, Any], type[Exception]]] = [
        ("lobby", {}, AlreadyJoined),
        ("bad room", {}, InvalidName),
        ("x" * 65, {}, InvalidName),
        (user_room("bob"), {}, Forbidden),
        ("red", {"since": -1}, InvalidInput),
        ("red", {"since": True}, InvalidInput),
        ("red", {"since": 0, "epoch": "no spaces"}, InvalidInput),
    ]
    for room, options, error in refusals:
        with pytest.raises(error):
            await manager.join(connection, room, **options)
    assert connection.rooms == {"lobby"}
    assert len(alice.texts) == 1
    assert await manager.presence("red") == []
    await manager.broadcast("lobby", "still here")
    await until(alice, lambda t: len(t.texts) == 2)


async def test_a_failed_backend_leaves_the_room_unjoined_and_the_connection_open() -> None:
    class FailingPresence(MemoryBackend):
        async def add_presence(self, room: str, client_id: str) -> bool:
            if room == "red":
                raise BackendUnavailable("down")
            return await super().add_presence(room, client_id)

    async with ConnectionManager(FailingPresence()) as manager:
        alice = MemoryTransport()
        connection = await manager.connect(alice, "alice", "lobby")
        with pytest.raises(BackendUnavailable):
            await manager.join(connection, "red")
        assert connection.rooms == {"lobby"}
        assert manager.statistics().rooms == 1
        await manager.broadcast("red", "not for alice")
        await manager.broadcast("lobby", "for alice")
        await until(alice, lambda t: last_data(t) == "for alice")
        assert of_room(alice, "red") == []


async def test_closing_a_connection_leaves_every_room_and_announces_each_departure(
    manager: ConnectionManager,
) -> None:
    alice, bob = MemoryTransport(), MemoryTransport()
    mine = await manager.connect(alice, "alice", "lobby")
    theirs = await manager.connect(bob, "bob", "lobby")
    for room in ("red", "blue"):
        await manager.join(mine, room)
        await manager.join(theirs, room)
    await manager.disconnect(mine)
    for room in ("lobby", "red", "blue"):
        assert await manager.presence(room) == ["bob"]
    await until(bob, lambda t: sum(e["type"] == "leave" for e in t.envelopes()) == 3)
    assert manager.statistics().rooms == 3  # bob's


# -- cancellation and closing during a join


async def join_cancelled_at(k: int, since: int | None) -> bool:
    """Cancel a join at its k-th await; check it leaks nothing. False once k is past the end."""
    harness = CheckpointCancel()
    async with ConnectionManager(CheckpointBackend(harness), close_timeout=0.5) as manager:
        watcher, alice = MemoryTransport(), MemoryTransport()
        await manager.connect(watcher, "watcher", "red")
        connection = await manager.connect(alice, "alice", "lobby")
        await manager.broadcast("red", "before")
        with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
            harness.arm(scope, k)
            await manager.join(connection, "red", since=since)
        reached = harness.reached
        harness.disarm()
        await anyio.wait_all_tasks_blocked()
        where = f"cancelled at await #{k}"
        assert connection.state is ConnectionState.OPEN, where
        if reached:
            assert connection.rooms == {"lobby"}, where
            assert await manager.presence("red") == ["watcher"], where
            # Any join announced for alice is followed by her leave.
            events = [e["type"] for e in watcher.envelopes() if e["client_id"] == "alice"]
            assert events in ([], ["join", "leave"]), where
        else:
            assert connection.rooms == {"lobby", "red"}, where
        await manager.broadcast("lobby", "after")
        await until(alice, lambda t: last_data(t) == "after")
        await manager.disconnect(connection)
        assert sorted(await manager.presence("red")) == ["watcher"], where
        return reached


@pytest.mark.parametrize("since", [None, 0])
async def test_a_join_cancelled_at_any_await_leaks_nothing(since: int | None) -> None:
    for k in range(100):
        if not await join_cancelled_at(k, since):
            assert k > 2  # the sweep did cancel inside the join
            return
    pytest.fail("the join never finished")


@pytest.mark.parametrize("manager_queue_size", [2])
async def test_a_connection_closed_while_its_history_replay_waits_cleans_up_every_room(
    manager: ConnectionManager,
) -> None:
    for n in range(10):
        await manager.broadcast("red", n)
    alice = MemoryTransport()
    connection = await manager.connect(alice, "alice", "lobby")
    alice.pause()  # the replay fills the queue and waits for alice to read
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.join, connection, "red", 0)
        await anyio.wait_all_tasks_blocked()
        assert "red" in connection.rooms
        with anyio.fail_after(GUARD):
            await manager.disconnect(connection)
    assert connection.state is ConnectionState.CLOSED
    assert await manager.presence("red") == []
    assert await manager.presence("lobby") == []
    assert manager.statistics().rooms == 0


# -- direct messages


async def test_a_direct_message_reaches_every_tab_of_recipient_and_sender_once_and_no_one_else(
    manager: ConnectionManager,
) -> None:
    tabs = {name: (MemoryTransport(), MemoryTransport()) for name in ("alice", "bob")}
    carol = MemoryTransport()
    for name, pair in tabs.items():
        for transport in pair:
            connection = await manager.connect(transport, name, "lobby")
            await manager.join(connection, user_room(name))
    carol_connection = await manager.connect(carol, "carol", "lobby")
    await manager.join(carol_connection, user_room("carol"))
    envelope = await manager.send_direct("bob", {"message": "hi"}, "alice")
    assert (envelope.type, envelope.room, envelope.client_id) == ("direct", "@bob", "alice")
    assert envelope.data == {"to": "bob", "data": {"message": "hi"}}
    await manager.broadcast("lobby", "marker")
    for name, pair in tabs.items():
        for transport in pair:
            await until(transport, lambda t: last_data(t) == "marker")
            direct = [e for e in transport.envelopes() if e["type"] == "direct"]
            assert len(direct) == 1, name
            assert direct[0]["room"] == f"@{name}"
            assert direct[0]["id"] == envelope.id  # the same message in both streams
            assert direct[0]["data"] == {"to": "bob", "data": {"message": "hi"}}
    await until(carol, lambda t: last_data(t) == "marker")
    assert not [e for e in carol.envelopes() if e["type"] == "direct"]
    # A message to oneself is delivered once per tab, from the server with a null client id.
    await manager.send_direct("alice", "note")
    await manager.send_direct("alice", "self", "alice")
    for transport in tabs["alice"]:
        await until(transport, lambda t: seqs(t, "@alice") == [1, 2, 3])
    assert [e["client_id"] for e in of_room(tabs["alice"][0], "@alice") if "seq" in e] == [
        "alice", None, "alice",
    ]  # fmt: skip


async def test_a_direct_message_to_someone_offline_is_kept_for_their_resume(
    manager: ConnectionManager,
) -> None:
    sent = await manager.send_direct("dave", {"message": "later"}, "alice")
    dave = MemoryTransport()
    connection = await manager.connect(dave, "dave", "lobby")
    await manager.join(connection, user_room("dave"), since=0)
    await until(dave, lambda t: bool(acks(t, "joined")))
    [received] = [e for e in dave.envelopes() if e["type"] == "direct"]
    assert received["id"] == sent.id
    assert (await acked(dave, "joined", "@dave"))["data"] == {"seq": 1, "epoch": sent.epoch}
    # Personal streams announce nothing and count nobody in presence.
    assert await manager.presence("@dave") == []


async def test_personal_streams_are_guarded(manager: ConnectionManager) -> None:
    for room in ("@bob", "@alice"):
        with pytest.raises(InvalidInput, match="personal stream"):
            await manager.broadcast(room, "forged")
    refused = MemoryTransport()
    with pytest.raises(Forbidden):
        await manager.connect(refused, "alice", "@bob")
    assert not refused.accepted
    # Connecting to one's own stream: no presence, no join; direct messages arrive.
    own = MemoryTransport()
    await manager.connect(own, "alice", "@alice")
    await manager.send_direct("alice", "hello")
    await until(own, lambda t: [e["type"] for e in t.envelopes()] == ["direct"])
    assert await manager.presence("@alice") == []
    with pytest.raises(InvalidInput, match="reserved"):
        await manager.broadcast("lobby", "forged", "alice", type="direct")
    with pytest.raises(InvalidName):
        await manager.send_direct("not valid", "x")
    with pytest.raises(InvalidName):
        await manager.send_direct("bob", "x", "not valid")
    # A 64-character client id has a 65-character personal stream, and may join it.
    name = "a" * 64
    transport = MemoryTransport()
    connection = await manager.connect(transport, name, "lobby")
    await manager.join(connection, user_room(name))
    await manager.send_direct(name, "long")
    await until(transport, lambda t: seqs(t, "@" + name) == [1])


# -- any interleaving of publishes, joins and leaves


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("join"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("leave"), st.sampled_from(["a", "b", "c"])),
        st.tuples(st.just("resume"), st.sampled_from(["a", "b", "c"])),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
async def test_every_membership_period_sees_its_rooms_stream_gap_free(
    ops: list[tuple[str, str]],
) -> None:
    """Between ``joined`` and ``left`` (or the end), a client gets exactly the envelopes of the
    room numbered after the ack's seq, in order; and a re-join with the last seq seen resumes
    with no gap and no duplicate."""
    async with ConnectionManager(queue_size=1000) as manager:
        observer = MemoryTransport()
        connection = await manager.connect(observer, "observer", "lobby")
        last_seen: dict[str, int] = {}
        resumed: list[tuple[str, int]] = []
        for op, room in ops:
            if op == "publish":
                await manager.broadcast(room, None)
            elif op == "leave" and room in connection.rooms:
                await manager.leave(connection, room)
            elif op in ("join", "resume") and room not in connection.rooms:
                since = last_seen.get(room) if op == "resume" else None
                await manager.join(connection, room, since=since)
                if since is not None:
                    resumed.append((room, since))
            await anyio.wait_all_tasks_blocked()
            for message in observer.messages():
                if "seq" in message and message["room"] != "lobby":
                    last_seen[message["room"]] = message["seq"]
        await anyio.wait_all_tasks_blocked()
        expected: dict[str, int] = {}
        previous: dict[str, int] = {}
        resumes = iter(resumed)
        replaying: dict[str, int | None] = {}
        for message in observer.messages():
            room = message["room"]
            if room == "lobby":
                continue
            if message["type"] == "joined":
                replaying.pop(room, None)
                expected[room] = message["data"]["seq"]
            elif message["type"] == "left":
                expected.pop(room)
            elif "seq" in message:
                seq = message["seq"]
                assert seq > previous.get(room, 0), json.dumps(message)  # never twice
                if room in expected:  # live: the next one
                    assert seq == expected[room] + 1, json.dumps(message)
                    expected[room] = seq
                else:  # replayed: right after what the client had
                    if room not in replaying:
                        replaying[room] = next(resumes)[1]
                        assert seq == replaying[room] + 1, json.dumps(message)  # type: ignore[operator]
                previous[room] = seq
        for room in connection.rooms - {"lobby"}:
            assert expected[room] == (await manager.backend.position(room))[1]


@pytest.mark.parametrize("transport_class", [MemoryTransport, MemoryBatchTransport])
@pytest.mark.parametrize("manager_queue_size", [8])
async def test_a_client_in_several_rooms_that_never_reads_is_closed_and_leaves_every_room(
    manager: ConnectionManager,
    transport_class: type[MemoryTransport],
) -> None:
    """Frames of all its rooms fill one bounded queue: it is closed with 4008 and leaves
    every room's presence, while a reader in the same rooms gets everything."""
    stalled, reader = transport_class(), MemoryTransport()
    stuck = await manager.connect(stalled, "stalled", "lobby")
    await manager.join(stuck, "red")
    await manager.join(stuck, user_room("stalled"))
    healthy = await manager.connect(reader, "reader", "lobby")
    await manager.join(healthy, "red")
    stalled.pause()
    sent = 0
    with anyio.fail_after(GUARD):
        while stuck.state is ConnectionState.OPEN:
            await manager.broadcast(("lobby", "red")[sent % 2], sent)
            await manager.send_direct("stalled", sent)
            sent += 1
            await anyio.wait_all_tasks_blocked()  # the reader's writer keeps up
        await stuck.wait_closed()
    assert stuck.close_code == CloseCode.SLOW_CONSUMER
    assert manager.statistics().slow_consumer_disconnects == 1
    for room in ("lobby", "red"):
        assert await manager.presence(room) == ["reader"]
    await manager.broadcast("red", "last")
    await until(reader, lambda t: last_data(t) == "last")
    assert [e["data"] for e in reader.envelopes() if e["type"] == "message"] == [
        *range(sent),
        "last",
    ]
