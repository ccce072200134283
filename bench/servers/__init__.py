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

import functools
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "node"
"""Node's ``ws`` server: ``server.js``, ``package.json`` and its lock (``npm ci`` installs)."""
NPM_CI_TIMEOUT = 180.0


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
    node_script: str | None = None
    """Run ``node NODE_DIR/SCRIPT`` instead of a Python module (``module`` is then unused)."""

    @property
    def available(self) -> bool:
        return self.module is not None or self.node_script is not None

    def unavailable_reason(self) -> str | None:
        """Why this server cannot run on this machine (None: it can); prepares it first.

        Node's server needs ``node`` and ``npm`` and its locked packages, which the first
        call installs with ``npm ci`` into ``bench/servers/node/node_modules``.
        """
        if not self.available:
            return "not implemented yet"
        if self.node_script is not None:
            return node_unavailable_reason()
        return None

    def command(self, port: int) -> list[str]:
        address = ["--host", "127.0.0.1", "--port", str(port)]
        if self.node_script is not None:
            return [shutil.which("node") or "node", str(NODE_DIR / self.node_script), *address]
        assert self.module is not None, f"{self.name} is not implemented yet"
        return [sys.executable, "-m", self.module, *address]


@functools.cache
def node_unavailable_reason() -> str | None:
    """None when ``node`` runs and ``ws`` is installed (``npm ci`` once, from the lock file);
    otherwise why not, for the report. Cached: the bench asks before every run."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node or npm not installed (Debian: apt-get install nodejs npm)"
    if (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        return None
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"npm ci failed: {exc}"
    if done.returncode != 0:
        return f"npm ci failed: {(done.stderr or done.stdout).strip()[-200:]}"
    return None


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
        ServerSpec(
            "node",
            "Node's `ws` 8 (npm, the locked version in bench/servers/node/package-lock.json):"
            " a ~50-line chat server, a Set of sockets and a seq per room, the envelope"
            " encoded once and sent to every open member (bench/servers/node/server.js)",
            None,
            node_script="server.js",
        ),
    )
}


def spec_command(spec: ServerSpec, port: int) -> list[str]:
    """The full command line of a server under test."""
    return [*spec.command(port), *spec.extra]
