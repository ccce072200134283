"""Helpers shared by the tests of every folder."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_ports(count: int, *, below: int = 65536) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that nothing listens on right now.

    Each is below ``below``: a Redis Cluster node also listens on its port + 10000 (its
    cluster bus), so the cluster's tests ask for ports below 55536. The probes stay bound
    until all are found, so that the kernel hands out distinct ports.
    """
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            sockets.append(probe)
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            if port < below and port not in ports:
                ports.append(port)
    finally:
        for probe in sockets:
            probe.close()
    return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def wait_until_healthy(
    process: subprocess.Popen[bytes], url: str, log: Callable[[], str], deadline: float = 30.0
) -> None:
    """Wait until the server ``process`` answers 200 at ``url``/healthz, for at most
    ``deadline`` seconds; raise with its ``log()`` if it exits or the deadline passes first."""
    give_up = time.monotonic() + deadline
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited at startup:\n{log()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > give_up:
            raise RuntimeError(f"the server did not start:\n{log()}")
        time.sleep(0.05)  # polling for readiness, bounded by the deadline
