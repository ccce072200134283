"""Cleanup has one owner: however a connection or the manager ends, every connection ends CLOSED.

CLOSED means: removed from its room (``stats().connections`` back down), gone from the
backend's presence, ``leave`` announced to the others (while the manager runs), its transport
closed (1001 at shutdown, 4008 for overflow) and ``wait_closed()`` returns. On plain and
fast-path transports, stalled ones with full queues included, on asyncio and trio. A send that
ignores cancellation and never returns must not hold the departure back.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import JsonValue

from tests.faults import GatedAcceptBatchTransport, HangingBatchTransport, HangingTransport
from tests.support import cyclic_garbage, kinds_from
from wsbroadcast import CloseCode, Connection, ConnectionManager, ConnectionState, ManagerNotRunning
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio

QUEUE = 4
CLOSE_TIMEOUT = 0.2
GUARD = 3.0
"""Hang guard (seconds) for what must finish within a bound derived from CLOSE_TIMEOUT."""


class Boom(Exception):
    """Raised in the body of ``async with manager``."""


def leaves(transport: MemoryTransport, client_id: str) -> int:
    return sum(
        1 for e in transport.envelopes() if e["type"] == "leave" and e["client_id"] == client_id
    )


def make(kind: str) -> MemoryTransport:
    return MemoryBatchTransport() if kind == "fast" else MemoryTransport()


async def send(
    manager: ConnectionManager, room: str, data: JsonValue, watchers: list[MemoryTransport]
) -> None:
    """Broadcast, then wait until every (healthy) watcher got it: only the victim lags."""
    envelope = await manager.broadcast(room, data, "filler")
    for watcher in watchers:
        await watcher.wait_until(lambda t: t.envelopes()[-1]["seq"] >= envelope.seq)


async def fill_queue(
    manager: ConnectionManager,
    connection: Connection,
    room: str,
    watchers: list[MemoryTransport] | None = None,
) -> None:
    """Broadcast to ``room`` until the (paused) connection's queue is full, not overflowing."""
    for n in range(QUEUE * 4):
        if connection.statistics().queued >= QUEUE:
            return
        await send(manager, room, {"fill": n}, watchers or [])
    raise AssertionError(f"could not fill the queue of {connection!r}")


# -- the manager ends


@pytest.mark.parametrize("how", ["return", "raise", "cancel_scope", "move_on_after_0"])
async def test_every_connection_is_closed_however_the_manager_ends(how: str) -> None:
    """Plain, fast-path, and stalled (paused, full queue) connections of each kind, one room
    each; the manager's ``async with`` ends by returning, by an exception in its body, or by
    cancellation. Afterwards each is CLOSED, closed with 1001, out of presence and stats.

    Under ``move_on_after(0)`` every checkpoint in the body is cancelled: whatever connect
    returned must be closed like the others, and a socket it accepted without returning
    must be closed too (with any code)."""
    backend = MemoryBackend()
    setups = [("plain", False), ("fast", False), ("plain", True), ("fast", True)]
    transports: dict[str, MemoryTransport] = {}
    connections: dict[str, Connection] = {}
    manager = ConnectionManager(backend, queue_size=QUEUE, close_timeout=CLOSE_TIMEOUT)
    ready = anyio.Event()

    async def body() -> None:
        async with manager:
            for kind, paused in setups:
                room = f"{kind}-{'paused' if paused else 'live'}"
                transport = transports[room] = make(kind)
                if paused:
                    transport.pause()
                connections[room] = await manager.connect(transport, room, room)
                if paused:
                    await fill_queue(manager, connections[room], room)
            ready.set()
            if how in ("return", "raise"):
                for _ in range(5):
                    await anyio.lowlevel.checkpoint()  # let writers and the flusher start
                if how == "raise":
                    raise Boom
                return
            await anyio.sleep_forever()  # cancelled

    with anyio.fail_after(10):
        if how == "raise":
            with pytest.raises(Boom):
                await body()
        elif how == "cancel_scope":
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(body)
                    await ready.wait()
                    scope.cancel()
            assert scope.cancelled_caught
        elif how == "move_on_after_0":
            with anyio.move_on_after(0) as scope:
                await body()
            assert scope.cancelled_caught
        else:
            await body()

    if how != "move_on_after_0":
        assert len(connections) == len(setups)
    states = {room: c.state for room, c in connections.items()}
    assert states == dict.fromkeys(connections, ConnectionState.CLOSED)
    codes = {room: transports[room].close_code for room in connections}
    assert codes == dict.fromkeys(connections, CloseCode.GOING_AWAY)
    unreturned = [room for room, t in transports.items() if t.accepted and room not in connections]
    assert all(transports[room].closed for room in unreturned), unreturned
    assert manager.statistics().connections == 0
    assert manager.statistics().rooms == 0
    for room in transports:
        assert await backend.presence(room) == [], room
    with anyio.fail_after(GUARD):
        for connection in connections.values():
            await connection.wait_closed()


# -- a connection ends while the manager runs


ENDINGS = [
    ("disconnect", "plain", False),
    ("disconnect", "fast", False),
    ("disconnect", "plain", True),
    ("disconnect", "fast", True),
    ("overflow", "plain", True),
    ("overflow", "fast", True),
    ("send_raises", "plain", False),
    ("send_raises", "fast", False),
]
every_ending = pytest.mark.parametrize(
    ("ending", "kind", "paused"),
    ENDINGS,
    ids=[f"{e}-{k}{'-paused' if p else ''}" for e, k, p in ENDINGS],
)


@every_ending
async def test_a_connection_that_ends_while_running_is_closed(
    ending: str, kind: str, paused: bool
) -> None:
    """disconnect (live or stalled with a full queue), slow-consumer overflow, a send that
    raises: the connection ends CLOSED, ``leave`` reaches the others, presence and stats
    drop it, and its transport is closed (1000, 4008, or however after a failed send)."""
    backend = MemoryBackend()
    async with ConnectionManager(backend, queue_size=QUEUE, close_timeout=CLOSE_TIMEOUT) as manager:
        watchers = [MemoryTransport(), MemoryBatchTransport()]
        for i, watcher in enumerate(watchers):
            await manager.connect(watcher, f"watcher{i}", "room")
        transport = make(kind)
        if ending == "send_raises":
            transport.fail_after = 1  # the join goes out; the next send raises
        connection = await manager.connect(transport, "victim", "room")
        await transport.wait_for_messages(1)
        if paused:
            transport.pause()
            await fill_queue(manager, connection, "room", watchers)
        assert connection.statistics().state is ConnectionState.OPEN
        with anyio.fail_after(GUARD):
            if ending == "disconnect":
                await manager.disconnect(connection)
            elif ending == "overflow":
                for n in range(QUEUE + 1):
                    await send(manager, "room", {"overflow": n}, watchers)
                assert connection.overflowed
            else:
                await send(manager, "room", "this send raises", watchers)
            await connection.wait_closed()
            for watcher in watchers:
                await watcher.wait_until(lambda t: leaves(t, "victim") > 0)
        assert connection.state is ConnectionState.CLOSED
        assert manager.statistics().connections == len(watchers)
        assert await backend.presence("room") == ["watcher0", "watcher1"]
        assert [leaves(w, "victim") for w in watchers] == [1, 1]
        assert transport.closed, "the transport was never closed"
        expected = {"disconnect": CloseCode.NORMAL, "overflow": CloseCode.SLOW_CONSUMER}
        if ending in expected:
            assert transport.close_code == expected[ending]
        transport.resume()
        # The room goes on for the others.
        envelope = await manager.broadcast("room", "after", "watcher0")
        with anyio.fail_after(GUARD):
            for watcher in watchers:
                await watcher.wait_until(lambda t: t.envelopes()[-1]["seq"] == envelope.seq)


@every_ending
async def test_a_closed_connection_is_freed_by_reference_counting(
    ending: str, kind: str, paused: bool
) -> None:
    """However it ended, a closed connection leaves no reference cycle: its memory comes
    back at once, not at the garbage collector's next full pass (which, with thousands of
    connections, stops the event loop for a long time), and freezing the collector's
    survivors (`wsbroadcast.gcpauses`) cannot leak it."""
    async with ConnectionManager(queue_size=QUEUE, close_timeout=CLOSE_TIMEOUT) as manager:
        watcher = MemoryBatchTransport()
        await manager.connect(watcher, "watcher", "room")
        await manager.broadcast("room", "warm-up", "watcher")  # lazily made objects, made
        with cyclic_garbage() as garbage:
            transport = make(kind)
            if ending == "send_raises":
                transport.fail_after = 1
            connection = await manager.connect(transport, "victim", "room")
            await manager.join(connection, "other")
            await transport.wait_for_messages(1)
            if paused:
                transport.pause()
                await fill_queue(manager, connection, "room", [watcher])
            with anyio.fail_after(GUARD):
                if ending == "disconnect":
                    await manager.disconnect(connection)
                elif ending == "overflow":
                    for n in range(QUEUE + 1):
                        await send(manager, "room", {"overflow": n}, [watcher])
                else:
                    await send(manager, "room", "this send raises", [watcher])
                await connection.wait_closed()
                await watcher.wait_until(lambda t: leaves(t, "victim") > 0)
            transport.resume()
            del connection, transport
        assert kinds_from(garbage, "wsbroadcast") == []


# -- a send that ignores cancellation and never returns


@pytest.mark.parametrize("kind", ["plain", "fast"])
@pytest.mark.parametrize("ending", ["disconnect", "overflow"])
async def test_a_send_that_never_returns_does_not_hold_back_the_departure(
    kind: str, ending: str
) -> None:
    """The victim's writer is stuck, shielded, in a send. After ``disconnect`` (called in a
    task) or an overflow, its presence is removed and ``leave`` is announced without the send
    being released, and ``wait_closed()`` returns within a bound derived from close_timeout.
    The manager's exit returns once the send is released."""
    backend = MemoryBackend()
    hanging: HangingTransport | HangingBatchTransport = (
        HangingBatchTransport() if kind == "fast" else HangingTransport()
    )
    watcher = MemoryTransport()
    with anyio.fail_after(10):
        async with ConnectionManager(
            backend, queue_size=QUEUE, close_timeout=CLOSE_TIMEOUT
        ) as manager:
            try:
                await manager.connect(watcher, "watcher", "room")
                connection = await manager.connect(hanging, "victim", "room")
                await hanging.stuck.wait()  # its writer is stuck sending the join
                async with anyio.create_task_group() as group:
                    if ending == "disconnect":
                        group.start_soon(manager.disconnect, connection)
                    else:
                        for n in range(QUEUE + 1):
                            await send(manager, "room", {"overflow": n}, [watcher])
                        assert connection.overflowed
                    with anyio.fail_after(GUARD):
                        await watcher.wait_until(lambda t: leaves(t, "victim") > 0)
                        assert await backend.presence("room") == ["watcher"]
                        await connection.wait_closed()
                assert connection.state is ConnectionState.CLOSED
                assert manager.statistics().connections == 1
                assert not hanging.texts, "the send was released by no one"
            finally:
                # Released here in every case: nothing can cancel the hanging send.
                hanging.release()
        assert hanging.closed
        expected = CloseCode.NORMAL if ending == "disconnect" else CloseCode.SLOW_CONSUMER
        assert hanging.close_code == expected
        assert leaves(watcher, "victim") == 1


# -- a fast-path connect whose handshake ends after the manager began exiting


@pytest.mark.parametrize("when", ["after_exit", "during_exit"])
async def test_a_fast_path_connect_accepted_after_exit_began_leaves_nothing_open(
    when: str,
) -> None:
    """``accept()`` finishes after the manager began exiting (while a hanging send holds its
    exit open, or after it has exited): connect raises ManagerNotRunning or returns an
    already-closed connection; it never raises anyio's "task group is not active", and the
    connection is counted nowhere."""
    backend = MemoryBackend()
    late = GatedAcceptBatchTransport()
    outcome: dict[str, Any] = {}
    done = anyio.Event()
    manager = ConnectionManager(backend, close_timeout=CLOSE_TIMEOUT)

    async def connect_late() -> None:
        try:
            outcome["connection"] = await manager.connect(late, "late", "room")
        except ManagerNotRunning:
            outcome["refused"] = True
        except Exception as exc:  # recorded to fail the test with it below
            outcome["error"] = exc
        finally:
            done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            hanging = HangingTransport()
            async with manager:
                await manager.connect(MemoryTransport(), "member", "room")
                group.start_soon(connect_late)
                await late.accepting.wait()
                if when == "during_exit":
                    await manager.connect(hanging, "stuck", "other")
                    await hanging.stuck.wait()

                    async def finish_accept_while_exiting() -> None:
                        try:
                            for _ in range(1000):
                                if not manager.running:
                                    break
                                await anyio.lowlevel.checkpoint()
                            assert not manager.running
                            late.finish_accept()
                            with anyio.move_on_after(GUARD):
                                await done.wait()
                        finally:
                            hanging.release()

                    group.start_soon(finish_accept_while_exiting)
            if when == "after_exit":
                late.finish_accept()
                await done.wait()

    assert "error" not in outcome, repr(outcome.get("error"))
    if "connection" in outcome:
        assert outcome["connection"].state is ConnectionState.CLOSED
    else:
        assert outcome.get("refused")
    if late.accepted:
        assert late.closed, "accepted, not returned open, and never closed"
    assert manager.statistics().connections == 0
    assert await backend.presence("room") == []
