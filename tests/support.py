"""Helpers shared by the tests of every folder."""

from __future__ import annotations

import contextlib
import gc
import socket
import subprocess
import time
import types
from collections.abc import Callable, Iterator


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
    import httpx  # here: the core tests run on Pythons without the web stack installed

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


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """Collect what the block leaves as cyclic garbage: objects that only the garbage
    collector would free, not reference counting (the list fills when the block ends).

    The collector is off inside the block, so nothing it makes is freed behind the test's
    back; the block must drop its own references to what it checks (``del``).
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    found: list[object] = []
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.extend(gc.garbage)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            if enabled:
                gc.enable()


def kinds_from(objects: list[object], *packages: str) -> list[str]:
    """The distinct kinds (module and class name) of ``objects`` defined in ``packages``,
    bound methods counted as their instance's, for a readable assertion."""
    kinds: set[str] = set()
    for thing in objects:
        # type(), not isinstance(): a weakref proxy to a dead object raises on the latter.
        owner = thing.__self__ if type(thing) is types.MethodType else thing
        module = getattr(type(owner), "__module__", "") or ""
        if module.split(".")[0] in packages:
            kinds.add(f"{module}.{type(owner).__qualname__}")
    return sorted(kinds)
