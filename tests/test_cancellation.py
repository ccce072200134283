"""Connect is cancellation-safe and atomic.

Cancelled at any await (of the backend or of the transport), ``connect`` leaves nothing
behind: no connection counted, no presence, no ``leave`` without its ``join``, no accepted
socket left open, and the room still works. A connect cancelled while it makes a new room's
subscription does not fail another connect to that room. And the first frame of every new
connection (no ``since``) is its own ``join``, with nothing of a lower seq after it, however
other tasks' publishes interleave with its connect.
"""

from __future__ import annotations

import json
import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.faults import (
    CheckpointBackend,
    CheckpointBatchTransport,
    CheckpointCancel,
    CheckpointTransport,
    GatedSubscribeBackend,
)
from wsbroadcast import Connection, ConnectionManager, ConnectionState
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = pytest.mark.anyio

GUARD = 5.0
ROOM = "room"
MOST_POINTS = 200
"""More awaits than any connect makes: the sweep over k must end before this."""


def presence_events(transport: MemoryTransport, client_id: str) -> list[str]:
    return [
        e["type"]
        for e in transport.envelopes()
        if e["client_id"] == client_id and e["type"] in ("join", "leave")
    ]


def last_seq(transport: MemoryTransport) -> int:
    return int(json.loads(transport.texts[-1]).get("seq", 0)) if transport.texts else 0


# -- cancelled at the k-th await, for every k


async def connect_cancelled_at(k: int, since_mode: str, room_mode: str, fast: bool) -> bool:
    """Connect "client" with cancellation at the k-th await; check nothing leaked.

    Returns whether the k-th await was reached (false once connect completes before it).
    """
    harness = CheckpointCancel()
    backend = CheckpointBackend(harness)
    async with ConnectionManager(backend, close_timeout=0.2) as manager:
        watcher = MemoryTransport()
        if room_mode == "existing":
            await manager.connect(watcher, "watcher", ROOM)
            for n in range(3):
                await manager.broadcast(ROOM, n, "watcher")
            with anyio.fail_after(GUARD):
                await watcher.wait_for_messages(4)
        baseline = manager.statistics()
        inner = MemoryBatchTransport() if fast else MemoryTransport()
        transport: CheckpointTransport = (
            CheckpointBatchTransport(inner, harness)
            if isinstance(inner, MemoryBatchTransport)
            else CheckpointTransport(inner, harness)
        )
        since = None if since_mode == "fresh" else (2 if room_mode == "existing" else 0)

        connection: Connection | None = None
        with anyio.fail_after(GUARD):
            with anyio.CancelScope() as scope:
                harness.arm(scope, k)
                connection = await manager.connect(transport, "client", ROOM, since=since)
        reached = harness.reached
        label = harness.labels[k] if len(harness.labels) > k else "not reached"
        harness.disarm()
        outcome = "returned" if connection is not None else "did not return"
        where = f"cancelled at await #{k} ({label}), connect {outcome}"

        await anyio.wait_all_tasks_blocked()  # whatever the cleanup left running settles
        present = "client" in await backend.presence(ROOM)
        if connection is None:
            stats = manager.statistics()
            assert stats.connections == baseline.connections, f"{where}: connection counted"
            assert stats.rooms == baseline.rooms, f"{where}: room kept"
            assert not present, f"{where}: left in presence"
            if inner.accepted:
                assert inner.closed, f"{where}: accepted, never closed"
        else:
            assert present, f"{where}: returned but not in presence"
            assert connection.state is ConnectionState.OPEN, where
            await manager.disconnect(connection)

        if room_mode == "new":
            # Joins now, and reads the room's whole history: every join and leave so far.
            await manager.connect(watcher, "watcher", ROOM, since=0)
        envelope = await manager.broadcast(ROOM, "still works", "watcher")
        with anyio.fail_after(GUARD):
            await watcher.wait_until(lambda t: last_seq(t) >= envelope.seq)
        events = presence_events(watcher, "client")
        assert events in ([], ["join", "leave"]), f"{where}: watcher saw {events}"
        return reached


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("room_mode", ["new", "existing"])
@pytest.mark.parametrize("since_mode", ["fresh", "since"])
async def test_connect_cancelled_at_any_await_leaks_nothing(
    since_mode: str, room_mode: str, fast: bool
) -> None:
    """For every k from 0 until connect completes without reaching k: cancel connect at its
    k-th await (before or after each backend and transport call). Every failing k is listed."""
    failures: list[str] = []
    for k in range(MOST_POINTS):
        try:
            reached = await connect_cancelled_at(k, since_mode, room_mode, fast)
        except (AssertionError, TimeoutError) as exc:
            failures.append(f"k={k}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        except Exception as exc:  # e.g. a foreign cancellation or a RuntimeError
            failures.append(f"k={k}: connect raised {exc!r}")
            continue
        if not reached:
            break
    else:
        failures.append(f"connect was still cancellable after {MOST_POINTS} awaits")
    assert not failures, "\n".join(failures)


# -- two connects to a new room, the first cancelled while it subscribes


@pytest.mark.parametrize("kind", [MemoryTransport, MemoryBatchTransport], ids=["plain", "fast"])
async def test_a_connect_cancelled_while_subscribing_does_not_fail_the_next(
    kind: type[MemoryTransport],
) -> None:
    backend = GatedSubscribeBackend()
    first, second = kind(), kind()
    outcome: dict[str, Any] = {}
    first_scope = anyio.CancelScope()

    async def connect_first() -> None:
        with first_scope:
            outcome["first"] = await manager.connect(first, "first", "new")

    async def connect_second() -> None:
        try:
            outcome["second"] = await manager.connect(second, "second", "new")
        except BaseException as exc:  # today: the first one's cancellation
            outcome["second_error"] = exc

    with anyio.fail_after(GUARD):
        async with ConnectionManager(backend) as manager:
            async with anyio.create_task_group() as group:
                backend.hold()
                group.start_soon(connect_first)
                await backend.subscribing.wait()
                group.start_soon(connect_second)
                for _ in range(100):
                    if second.accepted:
                        break
                    await anyio.lowlevel.checkpoint()
                assert second.accepted
                for _ in range(20):  # it now waits for the room the first one is making
                    await anyio.lowlevel.checkpoint()
                first_scope.cancel()
                # A subscription is made whole or not at all (shielded, bounded by the
                # manager's close_timeout): the cancelled connect ends once it is made.
                for _ in range(20):
                    await anyio.lowlevel.checkpoint()
                backend.let_go()
            assert "second_error" not in outcome, repr(outcome.get("second_error"))
            assert "first" not in outcome
            connection = outcome["second"]
            assert connection.state is ConnectionState.OPEN
            assert await backend.presence("new") == ["second"]
            assert manager.statistics().connections == 1
            if first.accepted:
                assert first.closed
            envelope = await manager.broadcast("new", "hello", "second")
            await second.wait_until(lambda t: last_seq(t) >= envelope.seq)
            assert second.envelopes()[0]["type"] == "join"
            assert second.envelopes()[0]["client_id"] == "second"
            assert [e["seq"] for e in second.envelopes()] == [1, 2]


# -- own join first


@pytest.mark.parametrize("seed", range(4))
async def test_the_first_frame_of_a_new_connection_is_its_own_join(seed: int) -> None:
    """Many connects in parallel, plain and fast-path, while three tasks publish; the backend
    yields 0-3 times at each of publish_draft, subscribe and add_presence (before and after),
    so that other publishes interleave with every step of each connect. Each new connection's
    frames are its own join, then every later seq, gap-free."""
    rng = random.Random(seed)
    interleaved = ("publish_draft", "subscribe", "add_presence")

    def turns(label: str) -> int:
        return rng.randint(0, 3) if label.split(":")[0] in interleaved else 0

    backend = CheckpointBackend(CheckpointCancel(turns))
    transports: dict[str, MemoryTransport] = {}
    with anyio.fail_after(10):
        async with ConnectionManager(backend, queue_size=100_000) as manager:
            stop = anyio.Event()

            async def publish(name: str) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    await manager.broadcast(ROOM, n, name)
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as publishers:
                for p in range(3):
                    publishers.start_soon(publish, f"publisher{p}")
                await anyio.lowlevel.checkpoint()
                async with anyio.create_task_group() as connects:
                    for i in range(24):
                        client_id = f"client{i}"
                        transport = transports[client_id] = (
                            MemoryBatchTransport() if i % 2 else MemoryTransport()
                        )
                        connects.start_soon(manager.connect, transport, client_id, ROOM)
                        if rng.random() < 0.5:
                            await anyio.lowlevel.checkpoint()
                stop.set()
            final = (await backend.history(ROOM, 0)).last_seq
            for transport in transports.values():
                await transport.wait_until(lambda t: last_seq(t) >= final)

    bad: list[str] = []
    for client_id, transport in transports.items():
        frames = [json.loads(frame) for frame in transport.texts]
        first = frames[0]
        seqs = [frame["seq"] for frame in frames]
        if (first["type"], first["client_id"]) != ("join", client_id):
            bad.append(f"{client_id}: first frame is {first['type']} of {first['client_id']}")
        if seqs != list(range(first["seq"], final + 1)):
            lower = [seq for seq in seqs[1:] if seq < seqs[0]]
            bad.append(f"{client_id}: seqs {seqs[:6]}...; lower after the first: {lower[:5]}")
    assert not bad, "\n".join(bad)
