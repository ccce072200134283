"""The benchmark harness's client side: the Socket.IO adapter, rooms and the stalled client.

Unit tests of the subscriber's tally (fed frames by a fake connection) and one end-to-end
test against the real python-socketio server under test on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from array import array
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.clients import (
    Shared,
    Tally,
    _receive,
    message_text,
    open_client,
    open_stalled_client,
    parse,
    sent_to_room,
)
from bench.procfs import ServerProcess
from bench.protocols import PROTOCOLS
from bench.servers import SERVERS, spec_command
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 20.0


class FakeConnection:
    """Just enough of a client connection for ``_receive``: frames in, frames sent recorded."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.sent: list[str] = []

    async def send(self, frame: str) -> None:
        self.sent.append(frame)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[str]:
        for frame in self.frames:
            yield frame


def _event(counter: int, room: int) -> str:
    envelope = {"type": "message", "data": {"message": message_text(counter, room, "xx")}}
    return "42" + json.dumps(["chat_message", envelope])


def test_sent_to_room_deals_every_message_to_exactly_one_room() -> None:
    for rooms in (1, 2, 3, 7, 50):
        for sent in range(120):
            counts = [sent_to_room(sent, rooms, room) for room in range(rooms)]
            assert sum(counts) == sent
            assert max(counts) - min(counts) <= 1


def test_message_text_round_trips_through_parse() -> None:
    before = time.time_ns()
    parsed = parse(json.dumps({"message": message_text(41, 3, "x" * 64)}))
    assert parsed is not None
    counter, sent_ns, room = parsed
    assert (counter, room) == (41, 3)
    assert before <= sent_ns <= time.time_ns()
    assert parse('{"type": "join", "client_id": "sub"}') is None
    assert parse("~warm-up~0~0~") is None


def test_socketio_subscriber_answers_pings_and_counts_its_room_only() -> None:
    frames = [
        "2",  # an Engine.IO ping: answered with "3"
        '40{"sid":"x"}',  # not an event
        _event(0, 1),
        _event(0, 0),  # another room's message
        _event(2, 1),
        _event(1, 1),  # out of order
        _event(2, 1),  # duplicate
        "2",
        _event(3, 1),
    ]
    ws = FakeConnection(frames)
    tally = Tally(bytearray(10), room=1)
    latencies: array[int] = array("q")
    shared = Shared(progress=[0], live=[1], slot=0)
    asyncio.run(_receive(ws, PROTOCOLS["socketio"], tally, latencies, [0], shared))  # type: ignore[arg-type]
    assert ws.sent == ["3", "3"]
    assert tally.wrong_room == 1
    assert tally.received == 5
    assert tally.duplicates == 1
    assert tally.out_of_order == 1
    assert bytes(tally.seen[:5]) == b"\x01\x01\x01\x01\x00"
    assert len(latencies) == 4
    assert tally.closed  # the fake ran out of frames: the connection ended
    assert shared.live == [0]


def test_plain_subscriber_ignores_socketio_pings() -> None:
    ws = FakeConnection(["2", json.dumps({"data": {"message": message_text(0, 0, "")}})])
    tally = Tally(bytearray(2))
    shared = Shared(progress=[0], live=[1], slot=0)
    asyncio.run(_receive(ws, PROTOCOLS["plain"], tally, array("q"), [0], shared))  # type: ignore[arg-type]
    assert ws.sent == []
    assert tally.received == 1


@pytest.fixture
def socketio_server(tmp_path: Path) -> Iterator[ServerProcess]:
    spec = SERVERS["socketio"]
    port = free_port()
    server = ServerProcess(spec.name, spec_command(spec, port), port, tmp_path / "server.log")
    try:
        server.start(ROOT)
        yield server
    finally:
        server.stop()


def _read_frame(sock: socket.socket) -> str:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the server closed the stalled client's connection"
            data += chunk
        return data

    _, second = exactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    elif length == 127:
        length = int.from_bytes(exactly(8), "big")
    return exactly(length).decode()


def test_socketio_stalled_client_is_a_member_of_its_room(
    socketio_server: ServerProcess,
) -> None:
    """The raw stalled client joins its room: what another member sends reaches its socket."""
    protocol = PROTOCOLS["socketio"]
    port = socketio_server.port
    stalled = open_stalled_client(
        "127.0.0.1", port, protocol.path("stalled", "r1"), protocol=protocol
    )
    try:

        async def send_one() -> None:
            ws = await open_client(
                f"ws://127.0.0.1:{port}" + protocol.path("sender", "r1"), protocol
            )
            try:
                await ws.send(protocol.encode(message_text(7, 0, "")))
                # The sender is in the room too: its own message coming back means it went out.
                async for frame in ws:
                    if isinstance(frame, str) and parse(frame) is not None:
                        break
            finally:
                await ws.close()

        asyncio.run(asyncio.wait_for(send_one(), DEADLINE))
        # Only now does the test read the stalled client's socket (the harness never does).
        stalled.settimeout(DEADLINE)
        for _ in range(10):
            frame = _read_frame(stalled)
            if frame.startswith("42"):
                break
        parsed = parse(frame)
        assert parsed is not None
        assert (parsed[0], parsed[2]) == (7, 0)
        assert '"room":"r1"' in frame
        assert '"client_id":"sender"' in frame
    finally:
        stalled.close()
