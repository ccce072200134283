"""Node's ``ws`` server under test (bench/servers/node/server.js) speaks the chat protocol.

Skipped, with the reason the bench would print, when node, npm or the locked ``ws`` cannot be
had. The first run installs ``ws`` with ``npm ci`` from the committed lock file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.clients import message_text, open_client, parse
from bench.procfs import ServerProcess
from bench.protocols import PROTOCOLS
from bench.servers import SERVERS, spec_command
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 20.0


@pytest.fixture
def node_server(tmp_path: Path) -> Iterator[ServerProcess]:
    spec = SERVERS["node"]
    reason = spec.unavailable_reason()
    if reason is not None:
        pytest.skip(f"Node's ws server cannot run here: {reason}")
    port = free_port()
    server = ServerProcess(spec.name, spec_command(spec, port), port, tmp_path / "node.log")
    try:
        server.start(ROOT)
        yield server
    finally:
        server.stop()


def test_node_server_broadcasts_envelopes_with_a_seq_per_room(node_server: ServerProcess) -> None:
    protocol = PROTOCOLS["plain"]
    base = f"ws://127.0.0.1:{node_server.port}"

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        sender = await open_client(base + protocol.path("alice", "r1"), protocol)
        member = await open_client(base + protocol.path("bob", "r1"), protocol)
        other = await open_client(base + protocol.path("carol", "r2"), protocol)
        try:
            for counter in range(3):
                await sender.send(protocol.encode(message_text(counter, 0, "x")))
            await other.send(protocol.encode(message_text(0, 1, "y")))
            got = [json.loads(await member.recv()) for _ in range(3)]
            mine = [json.loads(await other.recv())]
            return got, mine
        finally:
            for ws in (sender, member, other):
                await ws.close()

    got, mine = asyncio.run(asyncio.wait_for(scenario(), DEADLINE))
    assert [m["seq"] for m in got] == [1, 2, 3]
    assert {(m["type"], m["room"], m["client_id"]) for m in got} == {("message", "r1", "alice")}
    assert [parse(json.dumps(m))[0] for m in got] == [0, 1, 2]  # type: ignore[index]
    # Another room has its own seq, and r1's messages never reached it.
    assert [(m["room"], m["seq"], m["client_id"]) for m in mine] == [("r2", 1, "carol")]
