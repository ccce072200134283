"""Helpers shared by the Redis backend tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from wsbroadcast import Envelope
from wsbroadcast.backends.base import StreamReset

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
"""redis-py's asyncio client does not run on trio: every Redis test runs on asyncio only."""


class Recorder:
    """A listener that records envelopes (and, through :meth:`reset`, stream resets) and
    lets a test wait for a number of them.

    ``events`` holds both in the order they came, so a test can check that a reset was told
    before any envelope of the new stream.
    """

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.resets: list[StreamReset] = []
        self.events: list[Envelope | StreamReset] = []
        self._changed = anyio.Event()

    def __call__(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self.events.append(envelope)
        self._changed.set()

    def reset(self, reset: StreamReset) -> None:
        """The ``on_reset`` to subscribe with."""
        self.resets.append(reset)
        self.events.append(reset)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Envelope]:
        """Wait until ``count`` envelopes arrived (bounded by the caller's ``fail_after``)."""
        while len(self.envelopes) < count:
            self._changed = anyio.Event()
            await self._changed.wait()
        return self.envelopes

    async def wait_for_resets(self, count: int) -> list[StreamReset]:
        """Wait until ``count`` resets were told (bounded by the caller's ``fail_after``)."""
        while len(self.resets) < count:
            self._changed = anyio.Event()
            await self._changed.wait()
        return self.resets

    @property
    def seqs(self) -> list[int]:
        return [envelope.seq for envelope in self.envelopes]


async def eventually(predicate: Callable[[], Any]) -> None:
    """Wait until ``predicate()`` is true, checking every 10 ms (bounded by ``fail_after``).

    For states with no event to wait on, such as ``health()`` or presence seen from Redis.
    """
    while not predicate():  # noqa: ASYNC110
        await anyio.sleep(0.01)


class RedisServer:
    """A redis-server subprocess that a test can kill and start again on the same port."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start an empty server and wait (at most 10 s) until it answers PING."""
        assert self.process is None
        self.process = subprocess.Popen(
            [
                *(self.executable, "--save", "", "--appendonly", "no"),
                *("--port", str(self.port), "--bind", "127.0.0.1"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.kill()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGSTOP the server: it keeps its connections open but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a stopped server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no save, connections cut."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
