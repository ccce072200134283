"""Reading the chat app's frames in tests that follow one room's stream.

Once connected, every connection also joins its client's personal stream (``@client_id``,
its direct messages) and gets that stream's unsequenced ``joined`` frame; a test about the
room's frames passes over it with :func:`next_frame`.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection


def is_personal_ack(frame: Any) -> bool:
    """Whether ``frame`` is the ``joined`` frame of a personal stream (``@client_id``)."""
    room = frame.get("room") if isinstance(frame, dict) else None
    return frame.get("type") == "joined" and isinstance(room, str) and room.startswith("@")


async def next_frame(ws: ClientConnection, limit: float = 10) -> Any:
    """The next frame, parsed, other than the personal stream's ``joined`` frame; fails the
    test rather than hang (after ``limit`` seconds)."""
    with anyio.fail_after(limit):
        while True:
            frame = json.loads(await ws.recv())
            if not is_personal_ack(frame):
                return frame


async def until_personal_ack(ws: ClientConnection, limit: float = 10) -> list[Any]:
    """The frames up to and including the personal stream's ``joined``: once it came,
    direct messages to the client reach this connection."""
    frames = []
    with anyio.fail_after(limit):
        while True:
            frames.append(frame := json.loads(await ws.recv()))
            if is_personal_ack(frame):
                return frames
