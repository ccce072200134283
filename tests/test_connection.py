"""Connection on its own, built directly (no manager): its state, its one-off frames, its
writer and no-wait flush, replay, and how its closing reaches cancel scopes and waiters.

Connections as the manager runs them (the flusher, writer tasks, sessions) are tested in
test_manager.py."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.lowlevel
import pytest

from wsbroadcast import (
    CloseCode,
    Connection,
    ConnectionState,
    ControlMessage,
    OutboundMessage,
    SlowConsumerPolicy,
)
from wsbroadcast.envelope import Draft, Envelope
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio


class Calls:
    """What a connection told its manager: ready to flush, aborted."""

    def __init__(self) -> None:
        self.ready: list[Connection] = []
        self.aborted: list[Connection] = []


def make(
    transport: MemoryTransport, *, queue_size: int = 4, queue_bytes: int = 1 << 20
) -> tuple[Connection, Calls]:
    calls = Calls()
    connection = Connection(
        transport,
        "alice",
        "lobby",
        queue_size=queue_size,
        queue_bytes=queue_bytes,
        policy=SlowConsumerPolicy.DISCONNECT,
        on_ready=calls.ready.append,
        on_abort=calls.aborted.append,
    )
    return connection, calls


def envelope(seq: int, room: str = "lobby") -> Envelope:
    return Draft("message", room, "bob", {"n": seq}).envelope(seq, "epoch")


class BatchOnlyTransport(MemoryTransport):
    """Writes batches but never without waiting (like the websockets adapter); records the
    size of each batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def send_batch(self, messages: Sequence[OutboundMessage], /) -> None:
        self.batches.append(len(messages))
        for message in messages:
            await self.send_text(message.text)


def test_a_new_connection_recovers_in_its_first_room() -> None:
    first, _ = make(MemoryTransport())
    second, _ = make(MemoryTransport())
    assert second.id > first.id
    assert first.state is ConnectionState.RECOVERING
    assert (first.client_id, first.room, first.rooms) == ("alice", "lobby", frozenset({"lobby"}))
    assert first.in_room("lobby")
    assert not first.in_room("red")
    assert (first.last_seq, first.close_code, first.close_reason) == (0, None, None)
    assert not first.overflowed
    assert not first.writing
    assert repr(first) == f"<Connection #{first.id} client_id='alice' room='lobby' recovering>"


def test_one_off_frames_wait_for_the_end_of_recovery_then_flush_in_order() -> None:
    transport = MemoryBatchTransport()
    connection, calls = make(transport)
    assert connection.send_control("welcome", {"n": 1})
    assert connection.send_error("bad_input", "no", room="red")
    assert transport.texts == []
    assert calls.ready == []
    connection.queue.go_live(0)
    assert calls.ready == [connection]  # the manager's flusher is asked to write
    assert connection.statistics().queued == 2
    assert connection.flush()
    assert transport.messages() == [
        {"type": "welcome", "room": "lobby", "data": {"n": 1}},
        {"type": "error", "room": "red", "data": {"code": "bad_input", "detail": "no"}},
    ]
    stats = connection.statistics()
    assert (stats.queued, stats.delivered) == (0, 2)


def test_a_flush_the_socket_refuses_keeps_the_frames_for_a_writer() -> None:
    transport = MemoryBatchTransport()
    connection, _ = make(transport)
    connection.queue.go_live(0)
    connection.queue.push(envelope(1))
    transport.pause()
    assert not connection.flush()
    assert connection.statistics().queued == 1
    transport.resume()
    assert connection.flush()
    assert [e["seq"] for e in transport.envelopes()] == [1]
    assert connection.last_seq == 1
    assert connection.flush()  # nothing waiting: nothing to refuse


async def test_the_writer_sends_one_frame_at_a_time_and_waits_for_more() -> None:
    transport = MemoryTransport()
    connection, calls = make(transport)
    connection.queue.go_live(0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.write)
        await anyio.wait_all_tasks_blocked()
        assert connection.writing
        for seq in (1, 2):
            connection.queue.push(envelope(seq))
        await transport.wait_for_messages(2)
        connection.send_control("ping")
        await transport.wait_for_messages(3)
        assert calls.ready == []  # a writer's own wake-up, not the flusher's
        assert connection.queue.abort(CloseCode.GOING_AWAY, "bye")
    assert not connection.writing
    await connection.wait_writer()
    assert [m["type"] for m in transport.messages()] == ["message", "message", "ping"]
    assert calls.aborted == [connection]
    assert connection.statistics().delivered == 3


async def test_a_batch_writer_sends_everything_waiting_in_one_call() -> None:
    transport = BatchOnlyTransport()
    connection, _ = make(transport)
    connection.queue.go_live(0)
    for seq in (1, 2, 3):
        connection.queue.push(envelope(seq))
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.write)
        await transport.wait_for_messages(3)
        connection.queue.abort(CloseCode.NORMAL, "")
    assert transport.batches == [3]


async def test_a_nowait_writer_returns_once_the_queue_is_empty() -> None:
    transport = MemoryBatchTransport(turns_per_send=1)  # slow: no-wait writes are refused
    connection, _ = make(transport)
    connection.queue.go_live(0)
    connection.queue.push(envelope(1))
    assert not connection.flush()
    with anyio.fail_after(5):
        await connection.write()  # the flusher takes over from here
    assert [e["seq"] for e in transport.envelopes()] == [1]
    assert connection.state is ConnectionState.OPEN


async def test_a_writer_of_a_closing_connection_returns_at_once() -> None:
    transport = MemoryTransport()
    connection, _ = make(transport)
    connection.queue.go_live(0)
    connection.queue.push(envelope(1))
    connection.queue.abort(CloseCode.SLOW_CONSUMER, "slow")
    await connection.write()
    assert transport.texts == []
    assert connection.statistics().dropped == 1


async def test_send_now_bypasses_the_queue_and_counts_as_delivered() -> None:
    transport = MemoryTransport()
    connection, _ = make(transport)
    first = envelope(1)
    joined = ControlMessage("joined", None)
    await connection.send_now([first, joined])
    assert transport.texts == [first.text, joined.text]
    stats = connection.statistics()
    assert (stats.delivered, stats.queued) == (2, 0)


async def test_replay_waits_for_space_in_a_full_queue() -> None:
    transport = MemoryBatchTransport()
    connection, _ = make(transport, queue_size=2)
    connection.queue.go_live(0)
    replayed: list[bool] = []

    async def replay() -> None:
        replayed.append(await connection.replay([envelope(n) for n in (1, 2, 3, 4, 5)]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        while not replayed:
            await anyio.wait_all_tasks_blocked()
            assert connection.statistics().queued <= 2
            connection.flush()  # makes space: the replay goes on
    assert replayed == [True]
    connection.flush()
    assert [e["seq"] for e in transport.envelopes()] == [1, 2, 3, 4, 5]


async def test_replay_stops_when_the_connection_closes_while_it_waits() -> None:
    connection, _ = make(MemoryBatchTransport(), queue_size=1)
    connection.queue.go_live(0)
    replayed: list[bool] = []

    async def replay() -> None:
        replayed.append(await connection.replay([envelope(1), envelope(2)]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        await anyio.wait_all_tasks_blocked()
        assert replayed == []
        connection.queue.abort(CloseCode.GOING_AWAY, "shutdown")
    assert replayed == [False]
    assert not await connection.replay([envelope(3)])  # closed already


async def test_wait_closed_returns_once_the_manager_set_it_closed() -> None:
    connection, _ = make(MemoryTransport())
    closed: list[ConnectionState] = []

    async def waiter() -> None:
        await connection.wait_closed()
        closed.append(connection.state)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        connection.queue.abort(CloseCode.NORMAL, "done")
        await anyio.wait_all_tasks_blocked()
        assert closed == []  # closing is not closed
        connection.set_closed()
    assert closed == [ConnectionState.CLOSED]
    assert (connection.close_code, connection.close_reason) == (CloseCode.NORMAL, "done")
    await connection.wait_closed()  # closed already: returns at once


async def test_cancel_on_close_lets_errors_through_and_forgets_its_scope() -> None:
    connection, _ = make(MemoryTransport())

    async def fail_inside() -> anyio.CancelScope:
        with connection.cancel_on_close() as scope:
            await anyio.lowlevel.checkpoint()
            raise KeyError(scope)

    with pytest.raises(KeyError) as raised:
        await fail_inside()
    assert not raised.value.args[0].cancel_called
    assert not connection._cancel_on_close  # an abort later has nothing of it to cancel


async def test_cancel_on_close_is_cancelled_by_the_abort_and_only_while_entered() -> None:
    connection, _ = make(MemoryTransport())
    with connection.cancel_on_close() as finished:
        await anyio.lowlevel.checkpoint()
    with connection.cancel_on_close() as receiving:
        connection.queue.abort(CloseCode.SLOW_CONSUMER, "slow")
        await anyio.sleep_forever()
    assert receiving.cancelled_caught
    assert not finished.cancel_called
    with connection.cancel_on_close() as late:
        await anyio.sleep_forever()
    assert late.cancelled_caught
