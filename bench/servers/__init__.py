"""The servers under test and how to start each one (``python -m bench --servers ...``).

Every server but python-socketio speaks the chat app's protocol closely enough for one client
harness: clients connect at ``/ws/{client_id}?room=NAME``, send ``{"message": "..."}`` and
receive one JSON text frame per message whose ``data.message`` is the sender's text. The
socketio server has the same semantics in Socket.IO's protocol, which the harness speaks
through a small adapter (``bench/protocols.py``). The harness reads the
sender's own counter and send time from that text, so loss and order are measured the same
way for every server, whether or not it has sequence numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSpec:
    """How to run one server under test on a given port."""

    name: str
    description: str
    module: str | None
    """``python -m MODULE --host 127.0.0.1 --port N [extra]``; None: not implemented yet."""
    extra: tuple[str, ...] = ()
    redis: bool = False
    """It takes ``--backend redis://...`` and runs as several nodes on one Redis."""
    protocol: str = "plain"
    """The client protocol, a key of ``bench.protocols.PROTOCOLS``."""

    @property
    def available(self) -> bool:
        return self.module is not None

    def command(self, port: int) -> list[str]:
        assert self.module is not None, f"{self.name} is not implemented yet"
        return [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(port)]


_CHAT_ARGS = ("--rate-limit", "0", "--max-connections-per-ip", "0", "--log-level", "warning")
"""The chat app's flags under load from one address: no rate limit, no per-IP cap."""

SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec(
            "chat",
            "the project's chat app (examples/chat_app: Starlette + wsbroadcast) on uvicorn as"
            " `python -m examples.chat_app` serves it, with wsbroadcast's uvicorn protocol:"
            " each envelope's frame built once and a connection's waiting frames written in"
            " one go through the `wsbroadcast.frames` ASGI extension; rate limit off",
            "examples.chat_app",
            _CHAT_ARGS,
            redis=True,
        ),
        ServerSpec(
            "chat-asgi",
            "the same chat app with plain ASGI sends (`--ws websockets-sansio`: wsbroadcast's"
            " uvicorn protocol without its frames extension, one `websocket.send` per frame per"
            " client, as on uvicorn's own protocol)",
            "examples.chat_app",
            ("--ws", "websockets-sansio", *_CHAT_ARGS),
        ),
        ServerSpec(
            "naive",
            "seed-faithful naive Starlette app on uvicorn: a list of sockets, broadcast awaits"
            " send_text on each in turn (bench/servers/naive.py)",
            "bench.servers.naive",
        ),
        ServerSpec(
            "websockets",
            "the websockets library's asyncio server and its broadcast()"
            " (bench/servers/ws_broadcast.py)",
            "bench.servers.ws_broadcast",
        ),
        ServerSpec(
            "broadcaster",
            "encode/broadcaster (memory backend) in a Starlette app on uvicorn, as in its"
            " README: an unbounded queue per subscriber (bench/servers/broadcaster_app.py)",
            "bench.servers.broadcaster_app",
        ),
        ServerSpec(
            "fastpath",
            "the project's chat app on the websockets server (--server websockets): each"
            " envelope's frame built once, a connection's waiting frames in one write",
            "examples.chat_app",
            ("--server", "websockets", *_CHAT_ARGS),
        ),
        ServerSpec(
            "socketio",
            "python-socketio's AsyncServer (ASGI mode) on uvicorn: enter_room on connect,"
            " sio.emit(..., room=room) per message, Engine.IO v4 / Socket.IO v5 over WebSocket"
            " (bench/servers/socketio_app.py)",
            "bench.servers.socketio_app",
            protocol="socketio",
        ),
    )
}


def spec_command(spec: ServerSpec, port: int) -> list[str]:
    """The full command line of a server under test."""
    return [*spec.command(port), *spec.extra]
