"""The real chat app (and a redis-server) as subprocesses on 127.0.0.1, for the client tests.

A server can be killed with SIGKILL or stopped with SIGTERM and started again on the same
port, so that a client's reconnect and resume meet a real restart.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from tests.support import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 30.0
SERVER_KINDS = ("uvicorn", "websockets")
ROOMS_PROTOCOL = "dm_since" in (ROOT / "examples" / "chat_app" / "service.py").read_text()
"""Whether this checkout's chat app speaks several rooms and direct messages."""


class ChatApp:
    """``python -m examples.chat_app`` on a fixed free port, its log in ``directory``."""

    def __init__(self, directory: Path, kind: str, args: list[str]) -> None:
        self.port = free_port()
        self.kind = kind
        self.args = args
        self.log = directory / f"chat-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until ``/healthz`` answers 200 (bounded by a deadline)."""
        command = [sys.executable, "-m", "examples.chat_app", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--server", self.kind, *self.args]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        url = f"http://127.0.0.1:{self.port}"
        wait_until_healthy(self.process, url, self.log.read_text, STARTUP_DEADLINE)

    def kill(self) -> None:
        """SIGKILL: no close frame, no shutdown; the clients see their TCP connections cut."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout=15)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


class StallProxy:
    """A TCP proxy on 127.0.0.1 in front of a chat app that can stop reading what the server
    sends (:meth:`stall`) and start again (:meth:`unstall`), for a reader the server sees as
    slow while the client itself reads as fast as it can.

    While stalled, nothing more is read from the server: its socket's send buffer and the
    proxy's receive buffer (both small) fill, then the server's write buffer and its queue for
    the connection, where its slow-consumer policy applies. What the client sends is always
    forwarded. Run :meth:`serve` in a task group; ``started`` gives the port.
    """

    RECEIVE_BUFFER = 8192
    """SO_RCVBUF of the proxy's socket to the server: a stall backs up to the server quickly."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._flowing = anyio.Event()
        self._flowing.set()

    def stall(self) -> None:
        if self._flowing.is_set():
            self._flowing = anyio.Event()

    def unstall(self) -> None:
        self._flowing.set()

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener:
            task_status.started(listener.extra(SocketAttribute.local_port))
            await listener.serve(self._handle)

    async def _handle(self, client: SocketStream) -> None:
        async with client, anyio.create_task_group() as task_group:
            try:
                server = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return  # the server is down: the client sees its connection closed
            async with server:
                raw = server.extra(SocketAttribute.raw_socket)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RECEIVE_BUFFER)
                task_group.start_soon(self._pipe, client, server, False, task_group.cancel_scope)
                await self._pipe(server, client, True, task_group.cancel_scope)

    async def _pipe(
        self, source: SocketStream, sink: SocketStream, stallable: bool, scope: anyio.CancelScope
    ) -> None:
        """Copy ``source`` to ``sink`` until either ends, then end both directions."""
        try:
            while True:
                if stallable:
                    await self._flowing.wait()
                data = await source.receive()
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()
