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
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE = 30.0
SERVER_KINDS = ("uvicorn", "websockets")
ROOMS_PROTOCOL = "dm_since" in (ROOT / "examples" / "chat_app" / "service.py").read_text()
"""Whether this checkout's chat app speaks several rooms and direct messages."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        deadline = time.monotonic() + STARTUP_DEADLINE
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the chat app exited at startup:\n{self.log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).is_success:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the chat app did not start:\n{self.log.read_text()}")
            time.sleep(0.05)  # polling for readiness, bounded by the deadline

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
