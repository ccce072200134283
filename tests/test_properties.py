"""Property-based tests of broadcast ordering over in-memory transports of random speeds.

Hypothesis draws a program: connects (fresh or resuming), disconnects, broadcasts from
several senders to several rooms, and scheduler turns, run against a real
ConnectionManager on asyncio and on trio. The invariants checked are the guarantees
stated in docs/architecture.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsbroadcast import CloseCode, ConnectionManager, ConnectionState
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.connection import Connection
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

ROOMS = ("red", "blue")
CLIENTS = ("a", "b", "c", "d")

operation = st.one_of(
    st.tuples(
        st.just("connect"),
        st.sampled_from(CLIENTS),
        st.sampled_from(ROOMS),
        st.integers(0, 3),
        st.booleans(),
    ),
    st.tuples(st.just("broadcast"), st.sampled_from(CLIENTS), st.sampled_from(ROOMS)),
    st.tuples(st.just("broadcast"), st.sampled_from(CLIENTS), st.sampled_from(ROOMS)),
    st.tuples(st.just("disconnect"), st.integers(0, 50)),
    st.tuples(st.just("resume"), st.integers(0, 50)),
    st.tuples(st.just("turn"), st.integers(1, 5)),
)


@dataclass
class Session:
    """One connection's life, from connect to disconnect."""

    client_id: str
    room: str
    transport: MemoryTransport
    connection: Connection
    since: int | None
    seq_before: int
    stalled: bool = False
    ended: bool = False
    frames: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    sessions: list[Session] = field(default_factory=list)
    sent: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """Per room: (sender, sender's counter, seq) of each broadcast, in the order issued."""
    last_seq: dict[str, int] = field(default_factory=dict)


async def execute(
    program: list[tuple[Any, ...]], policy: str, queue_size: int, with_stalled: bool
) -> tuple[Run, MemoryBackend, ConnectionManager]:
    backend = MemoryBackend(history_size=10_000)
    run = Run()
    counters: dict[str, int] = dict.fromkeys(CLIENTS, 0)

    async def connect(
        client_id: str,
        room: str,
        turns: int,
        since: int | None,
        fast: bool = False,
        epoch: str | None = None,
    ) -> Session:
        # fast: the flusher's no-wait batch path (falling back to the writer when slow).
        kind = MemoryBatchTransport if fast else MemoryTransport
        transport = kind(turns_per_send=turns)
        before = backend._rooms[room].seq if room in backend._rooms else 0
        connection = await manager.connect(transport, client_id, room, since=since, epoch=epoch)
        session = Session(client_id, room, transport, connection, since, before)
        run.sessions.append(session)
        return session

    def open_sessions() -> list[Session]:
        return [s for s in run.sessions if not s.ended and not s.stalled]

    async with ConnectionManager(backend, queue_size=queue_size, slow_consumer=policy) as manager:
        if with_stalled:
            stalled = await connect("stalled", "red", 0, None)
            stalled.stalled = True
            stalled.transport.pause()
        for op in program:
            kind = op[0]
            if kind == "connect":
                await connect(op[1], op[2], op[3], None, op[4])
                # As a server would between handshakes: the new writer starts.
                await anyio.lowlevel.checkpoint()
            elif kind == "broadcast":
                counters[op[1]] += 1
                envelope = await manager.broadcast(op[2], counters[op[1]], op[1])
                run.sent.setdefault(op[2], []).append((op[1], counters[op[1]], envelope.seq))
            elif kind in ("disconnect", "resume"):
                candidates = open_sessions()
                if not candidates:
                    continue
                session = candidates[op[1] % len(candidates)]
                await manager.disconnect(session.connection)
                session.ended = True
                if kind == "resume":
                    seen = [json.loads(f) for f in session.transport.texts]
                    seqs = [f["seq"] for f in seen if "seq" in f]
                    since = seqs[-1] if seqs else session.seq_before
                    # The epoch of the last envelope seen: the stream is the same, so the
                    # resume must be exact (a wrong epoch is attacked below).
                    epochs = [f["epoch"] for f in seen if "epoch" in f]
                    await connect(
                        session.client_id,
                        session.room,
                        0,
                        since,
                        epoch=epochs[-1] if epochs else None,
                    )
            else:
                for _ in range(op[1]):
                    await anyio.lowlevel.checkpoint()
        # Every live, healthy connection catches up while the stalled one still holds
        # its frames: a stalled client delays nobody. Repeat until no departure announced
        # meanwhile has moved a room on.
        while True:
            seqs_before = {room: state.seq for room, state in backend._rooms.items()}
            for session in open_sessions():
                # A hang guard: a connection that never catches up has lost frames.
                with anyio.fail_after(10):

                    def session_caught_up(t: MemoryTransport, s: Session = session) -> bool:
                        return caught_up(s)

                    await session.transport.wait_until(session_caught_up)
            run.last_seq = {room: state.seq for room, state in backend._rooms.items()}
            if run.last_seq == seqs_before:
                break
        if with_stalled:
            assert stalled.connection.state is not ConnectionState.CLOSED or (
                stalled.transport.close_code == CloseCode.SLOW_CONSUMER
            )
            stalled.transport.resume()
    for session in run.sessions:
        session.frames = [json.loads(f) for f in session.transport.texts]
    return run, backend, manager


def caught_up(session: Session) -> bool:
    """True once the transport holds everything queued for it, or it is closed."""
    connection = session.connection
    if connection.state is not ConnectionState.OPEN:
        return True
    seqs = [json.loads(f).get("seq", 0) for f in session.transport.texts]
    newest = max([*seqs, session.since or 0])
    return connection.statistics().queued == 0 and newest >= connection.last_seq


def check(run: Run, backend: MemoryBackend, policy: str) -> None:
    canonical = {
        # History entries are (seq, size, text, ...): see wsbroadcast.envelope.Stored.
        room: {seq: text for seq, _, text, *_ in state.history or ()}
        for room, state in backend._rooms.items()
    }
    for sent in run.sent.values():
        # Per-sender FIFO: a sender's broadcasts take increasing seqs in the order issued.
        for sender in CLIENTS:
            seqs = [seq for who, _, seq in sent if who == sender]
            assert seqs == sorted(seqs)
    for session in run.sessions:
        envelopes = [f for f in session.frames if "seq" in f]
        seqs = [e["seq"] for e in envelopes]
        room_texts = canonical.get(session.room, {})
        # One order for everyone: each received envelope is the one the backend ordered.
        for envelope in envelopes:
            assert envelope["room"] == session.room
            assert (
                json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
                == (room_texts[envelope["seq"]])
            )
        # Strictly increasing: nothing twice, nothing out of order.
        assert seqs == sorted(set(seqs))
        overflowed = session.connection.overflowed
        if policy == "disconnect" or not session.connection.statistics().dropped:
            # Gap-free (drop_oldest may leave gaps, which the client sees).
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
        if session.since is not None and seqs and not overflowed:
            # Resume yields exactly the missing suffix, starting right after `since`.
            assert seqs[0] == session.since + 1
        if session.since is None and seqs:
            # A fresh connection starts with the first envelope after it registered.
            assert seqs[0] > session.seq_before
        if not session.ended and not session.stalled and not overflowed:
            closed = session.transport.close_code
            if closed == CloseCode.GOING_AWAY and seqs:
                # It was open until shutdown: it saw its room up to the last seq.
                assert seqs[-1] == run.last_seq[session.room]


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    program=st.lists(operation, max_size=40),
    with_stalled=st.booleans(),
)
def test_ordering_under_random_interleavings(
    async_backend: str, program: list[tuple[Any, ...]], with_stalled: bool
) -> None:
    run, backend, _ = anyio.run(
        execute, program, "disconnect", 10_000, with_stalled, backend=async_backend
    )
    check(run, backend, "disconnect")


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=st.lists(operation, max_size=40),
    policy=st.sampled_from(["disconnect", "drop_oldest"]),
    queue_size=st.integers(1, 4),
)
def test_small_queues_keep_order_under_either_policy(
    async_backend: str, program: list[tuple[Any, ...]], policy: str, queue_size: int
) -> None:
    run, backend, manager = anyio.run(
        execute, program, policy, queue_size, False, backend=async_backend
    )
    check(run, backend, policy)
    if policy == "drop_oldest":
        assert manager.statistics().slow_consumer_disconnects == 0


@settings(max_examples=200)
@given(
    history_size=st.integers(0, 6),
    published=st.integers(0, 12),
    since=st.integers(0, 15),
    epoch=st.sampled_from(["same", "other", None]),
)
def test_history_is_all_or_nothing(
    history_size: int, published: int, since: int, epoch: str | None
) -> None:
    async def scenario() -> None:
        backend = MemoryBackend(history_size=history_size)
        for n in range(published):
            await backend.publish("room", "message", "a", n)
        current = (await backend.history("room", 0)).epoch
        asked = {"same": current, "other": "another", None: None}[epoch]
        history = await backend.history("room", since, asked)
        first_held = max(1, published - history_size + 1)
        assert history.last_seq == published
        same_stream = since == 0 or asked is None or asked == current
        assert history.complete == (first_held - 1 <= since <= published and same_stream)
        if history.complete:
            assert [e.seq for e in history.envelopes] == list(range(since + 1, published + 1))
        else:
            assert list(history.envelopes) == []

    anyio.run(scenario)
