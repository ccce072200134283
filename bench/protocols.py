"""How the client harness speaks to a server under test over a plain WebSocket.

Every server but one speaks the chat protocol (`Plain`): connect at
``/ws/{client_id}?room=NAME``, send ``{"message": "..."}``, receive one JSON text frame per
message. python-socketio speaks Socket.IO v5 over Engine.IO v4 (`SocketIO`): the same
``websockets`` client, with the few packets of that protocol the harness needs. Either way the
sender's text (``~K~T~R~pad``) appears verbatim in the frame a subscriber receives.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection

JOIN_TIMEOUT = 20.0
MAX_HANDSHAKE_FRAMES = 10


class ProtocolError(Exception):
    """The server did not complete the protocol's handshake."""


class Plain:
    """The chat protocol: a WebSocket handshake is all it takes to be in the room."""

    name = "plain"
    ping: str | None = None
    """A frame that the client must answer with `pong` (None: no such frame)."""
    pong = ""
    message_prefix = ""
    """Frames that carry a room message start with this; others are not the sender's."""
    raw_join: tuple[str, ...] = ()
    """Text frames a raw client sends after the WebSocket handshake to join its room."""
    joined_prefix: str | None = None
    """The raw client reads frames up to one starting with this (None: reads none)."""

    def path(self, client_id: str, room: str) -> str:
        """The request target (path and query) of a client of ``room``."""
        return f"/ws/{client_id}?{urlencode({'room': room})}"

    async def join(self, ws: ClientConnection) -> None:
        """Complete the protocol's handshake on an open WebSocket (nothing to do here)."""

    def encode(self, text: str) -> str:
        """The frame that sends the chat message ``text``."""
        return json.dumps({"message": text})


class SocketIO(Plain):
    """Socket.IO v5 over Engine.IO v4, WebSocket transport from the start, default namespace.

    Engine.IO packets are one text frame each: ``0{...}`` open, ``2`` ping (answer ``3``),
    ``4`` message. A Socket.IO packet rides in an Engine.IO message: ``40`` connects to the
    namespace (the server answers ``40{"sid": ...}``, or ``44{...}`` to refuse), and
    ``42["event", data]`` is an event. The room and client id travel in the query string.
    """

    name = "socketio"
    ping = "2"
    pong = "3"
    message_prefix = "42"
    raw_join = ("40",)
    joined_prefix = "40"

    def path(self, client_id: str, room: str) -> str:
        query = {"EIO": "4", "transport": "websocket", "room": room, "client_id": client_id}
        return f"/socket.io/?{urlencode(query)}"

    async def join(self, ws: ClientConnection) -> None:
        """Read the open packet, connect to the namespace, wait for the server's ``40``."""
        await asyncio.wait_for(self._join(ws), JOIN_TIMEOUT)

    async def _join(self, ws: ClientConnection) -> None:
        opened = await ws.recv()
        if not isinstance(opened, str) or not opened.startswith("0{"):
            raise ProtocolError(f"expected an Engine.IO open packet, got {opened!r:.80}")
        await ws.send("40")
        for _ in range(MAX_HANDSHAKE_FRAMES):
            frame = await ws.recv()
            if frame == self.ping:
                await ws.send(self.pong)
            elif isinstance(frame, str) and frame.startswith("40"):
                return
            else:
                raise ProtocolError(f"namespace connect refused: {frame!r:.80}")
        raise ProtocolError("no namespace connect reply")

    def encode(self, text: str) -> str:
        return "42" + json.dumps(["message", {"message": text}])


PROTOCOLS: dict[str, Plain] = {protocol.name: protocol for protocol in (Plain(), SocketIO())}
