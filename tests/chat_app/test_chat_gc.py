"""The chat app leaves no reference cycle when a connection closes, so that freezing the
garbage collector's survivors (``--gc-freeze``, the default of ``python -m
examples.chat_app``) leaks nothing; and ``/metrics`` reports the collector's pauses."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.chat_app.servers import StartServer, chat_in_process
from tests.support import cyclic_garbage, kinds_from
from tests.transports.support import FinishedProtocol


async def frames_until(client: ClientConnection, wanted: str) -> dict[str, Any]:
    """Read the client's frames until one of type ``wanted``; return it."""
    while True:
        frame = json.loads(await client.recv())
        if frame["type"] == wanted:
            return dict(frame)


async def one_visit(url: str, closes: str) -> None:
    """A client's whole visit: join, say something, join and leave a room, message itself,
    send a bad frame; then it leaves (or is closed by the server for a frame too big)."""
    async with connect(f"{url}/ws/alice?room=lobby", max_size=None) as client:
        await frames_until(client, "join")
        await client.send(json.dumps({"message": "hello"}))
        assert (await frames_until(client, "message"))["data"] == {"message": "hello"}
        await client.send(json.dumps({"join": "kitchen"}))
        await frames_until(client, "joined")
        await client.send(json.dumps({"leave": "kitchen"}))
        await frames_until(client, "left")
        await client.send(json.dumps({"to": "alice", "message": "note to self"}))
        await frames_until(client, "direct")
        await client.send("not json")
        await frames_until(client, "error")
        if closes == "server":
            await client.send("x" * 70_000)  # over max_message_bytes: closed with 1009
            await client.wait_closed()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("closes", ["client", "server"])
async def test_a_closed_chat_connection_is_freed_by_reference_counting(closes: str) -> None:
    garbage: list[object] = []
    with anyio.fail_after(60):
        async with chat_in_process(FinishedProtocol) as port:
            url = f"ws://127.0.0.1:{port}"
            for _ in range(2):  # the first visit makes what the app makes once
                FinishedProtocol.done = anyio.Event()
                with cyclic_garbage() as garbage:
                    await one_visit(url, closes)
                    await FinishedProtocol.done.wait()
    # Objects of the event loop (asyncio's own here; uvloop in production) and of the
    # client are not checked: they are not the server's per-connection objects.
    assert kinds_from(garbage, "wsbroadcast", "examples", "uvicorn", "starlette") == []


def test_metrics_report_the_collectors_pauses(start_server: StartServer) -> None:
    """python -m examples.chat_app freezes by default; --no-gc-freeze only measures."""
    for flags, freezes in ((), True), (("--no-gc-freeze",), False):
        server = start_server(*flags)
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        for name in (
            "chat_gc_full_collections_total",
            "chat_gc_pause_seconds_total",
            "chat_gc_longest_pause_seconds",
            "chat_gc_freezes_total",
            "chat_gc_thaws_total",
            "chat_gc_frozen_objects",
        ):
            assert re.search(rf"^{name} [0-9.e+-]+$", text, re.MULTILINE), name
        if not freezes:
            assert re.search(r"^chat_gc_freezes_total 0$", text, re.MULTILINE)
