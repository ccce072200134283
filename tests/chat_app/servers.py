"""The chat app started as a user starts it, in a subprocess, for the chat app's tests; and
in the tests' own process, for those that look inside the server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import uvicorn

from examples.chat_app.app import create_app
from examples.chat_app.service import CLOSE_WAIT, Settings
from tests.support import free_port, wait_until_healthy
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol

ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 30.0
SERVER_KINDS = ("uvicorn", "uvicorn-asgi", "websockets")
SERVER_ARGS = {
    "uvicorn": ["--server", "uvicorn"],  # wsbroadcast's uvicorn protocol: the fast path
    "uvicorn-asgi": ["--server", "uvicorn", "--ws", "websockets-sansio"],  # plain ASGI sends
    "websockets": ["--server", "websockets"],
}
READY_LINES = {
    "uvicorn": "Application startup complete",
    "uvicorn-asgi": "Application startup complete",
    "websockets": "server listening on",
    "hypercorn": "Running on http://",
}
"""What each server logs once it serves: proof that its log is really captured."""


class ChatServer:
    """``python -m examples.chat_app`` in a subprocess on 127.0.0.1, its output in files.

    Kind ``hypercorn`` (in no :data:`SERVER_KINDS`: only the tests that ask for it) runs
    ``python -m hypercorn --worker-class trio`` instead, with ``args`` as hypercorn's flags
    and application (``module:expression``). Its main process serves through a worker
    process that it spawns, so it starts in a process group of its own, killed whole if it
    lingers.
    """

    def __init__(self, directory: Path, args: list[str], kind: str = "uvicorn") -> None:
        self.port = free_port()
        self.args = args
        self.kind = kind
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.stdout_path = directory / "stdout.log"
        self.stderr_path = directory / "stderr.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server (run from the repository's root)."""
        if self.kind == "hypercorn":
            command = [sys.executable, "-m", "hypercorn", "--worker-class", "trio"]
            return [*command, "--bind", f"127.0.0.1:{self.port}", *self.args]
        command = [sys.executable, "-m", "examples.chat_app", "--host", "127.0.0.1"]
        return [*command, "--port", str(self.port), *SERVER_ARGS[self.kind], *self.args]

    def start(self) -> None:
        """Start the server and wait until ``/healthz`` answers (bounded by a deadline)."""
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=self.kind == "hypercorn",
            )
        wait_until_healthy(self.process, self.url, self.stderr, STARTUP_DEADLINE)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            if self.kind == "hypercorn":  # its worker too: the group is the server's own
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=15)

    def restart(self) -> None:
        """Stop and start again on the same port (all in-memory state is lost)."""
        self.stop()
        self.start()

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far (the server's log goes there)."""
        return self.stderr_path.read_text(errors="replace")

    @property
    def ready_line(self) -> str:
        """A line the server logs once it serves."""
        return READY_LINES[self.kind]


StartServer = Callable[..., ChatServer]


@contextlib.asynccontextmanager
async def chat_in_process(
    ws: type[WebSocketProtocol] = WebSocketProtocol,
) -> AsyncIterator[int]:
    """The chat app on uvicorn in this process and its event loop, served as ``python -m
    examples.chat_app`` serves it (rate limits off), with ``ws`` (a subclass of wsbroadcast's
    protocol) for its WebSocket connections; yields its port on 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)  # clients may connect before uvicorn starts accepting
    settings = Settings(rate_limit=0, max_connections_per_ip=0)
    config = uvicorn.Config(
        create_app(settings),
        http=HttpToolsProtocol.configure(head_timeout=settings.handshake_timeout),
        ws=ws.configure(close_wait=CLOSE_WAIT),
        ws_per_message_deflate=False,
        ws_max_size=settings.max_message_bytes,
        lifespan="on",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [listener])
            try:
                yield listener.getsockname()[1]
            finally:
                server.should_exit = True
    finally:
        listener.close()
