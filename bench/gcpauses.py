"""Garbage-collector pauses of the chat app while clients connect and reconnect.

``python -m bench.gcpauses`` starts the chat app on uvicorn twice: once as ``python -m
examples.chat_app`` serves it (``--gc-freeze``, the default: the survivors of each full
collection are frozen) and once with ``--no-gc-freeze`` (CPython's collector as it is; the
pauses are only measured). In each, raw clients on 127.0.0.1 (rooms of 20):

1. connect, ``--connections`` of them, in steps (growth);
2. then, ``--storms`` times, half of them leave and connect again, with the same client
   ids and rooms (a reconnect storm).

After each phase it reads the server's ``/metrics`` (``chat_gc_*``: full collections, the
time they took, the longest so far) and its resident memory, and prints one table per mode
and the ratio of their longest pauses: CPython's collector stops the event loop for as long
as a full collection takes, and every client of the process waits meanwhile. Bounded:
``--connections`` clients at most, on loopback, each phase within a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .procfs import ServerProcess, free_port, rss_kib, wait_quiet
from .protocols import Plain
from .rawws import RawClient, open_raw

ROOT = Path(__file__).resolve().parent.parent
ROOM_SIZE = 20
PHASE_DEADLINE = 300.0
"""Seconds a phase (connecting or closing its clients) may take."""
T = TypeVar("T")
_FLAGS = ("--rate-limit", "0", "--max-connections-per-ip", "0", "--log-level", "warning")


@dataclass(frozen=True)
class Phase:
    """What the server reported after one phase."""

    name: str
    connections: int
    full_collections: int
    pause_seconds: float
    """Time spent in the full collections of this phase."""
    longest_pause: float
    """The longest full collection so far (this phase or before)."""
    frozen_objects: int
    rss_kib: int


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{name} is not in /metrics")
    return float(match[1])


def _scrape(port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = (
        "chat_gc_full_collections_total",
        "chat_gc_pause_seconds_total",
        "chat_gc_longest_pause_seconds",
        "chat_gc_frozen_objects",
        "chat_connections",
    )
    return {name: _metric(text, name) for name in names}


async def _connect(port: int, ids: list[int]) -> list[RawClient]:
    protocol = Plain()
    clients = []
    for n in ids:
        path = protocol.path(f"c{n}", f"room{n // ROOM_SIZE}")
        clients.append(await open_raw("127.0.0.1", port, path, protocol))
    return clients


async def _close(clients: list[RawClient]) -> None:
    for client in clients:
        client.close()
    await asyncio.gather(*(client.closed for client in clients))


async def run_mode(freeze: bool, connections: int, steps: int, storms: int) -> list[Phase]:
    """One server, growth then storms; the server's figures after each phase."""
    port = free_port()
    flag = "--gc-freeze" if freeze else "--no-gc-freeze"
    log = Path(tempfile.gettempdir()) / f"bench-gcpauses-{port}.log"
    command = [sys.executable, "-m", "examples.chat_app", "--port", str(port), flag, *_FLAGS]
    server = ServerProcess(f"chat {flag}", command, port, log)
    server.start(ROOT)
    phases: list[Phase] = []
    before = {"chat_gc_pause_seconds_total": 0.0, "chat_gc_full_collections_total": 0.0}

    def record(name: str) -> None:
        wait_quiet(server.pid)
        now = _scrape(port)
        phases.append(
            Phase(
                name,
                int(now["chat_connections"]),
                int(
                    now["chat_gc_full_collections_total"] - before["chat_gc_full_collections_total"]
                ),
                now["chat_gc_pause_seconds_total"] - before["chat_gc_pause_seconds_total"],
                now["chat_gc_longest_pause_seconds"],
                int(now["chat_gc_frozen_objects"]),
                rss_kib(server.pid),
            )
        )
        before.update(now)

    try:
        record("started")
        step = max(1, connections // steps)

        async def grow() -> list[RawClient]:
            clients: list[RawClient] = []
            while len(clients) < connections:
                first = len(clients)
                clients += await _connect(port, list(range(first, min(first + step, connections))))
            return clients

        clients = await _within(grow())
        record(f"{connections} connected")
        ids = list(range(connections))
        for storm in range(1, storms + 1):
            half = len(clients) // 2
            await _within(_close(clients[:half]))
            back = await _within(_connect(port, ids[:half]))
            clients = clients[half:] + back
            ids = ids[half:] + ids[:half]
            record(f"storm {storm}: {half} reconnected")
        await _within(_close(clients))
    finally:
        server.stop()
    return phases


async def _within(phase: Coroutine[Any, Any, T]) -> T:
    """``phase``, cancelled with an error once it has taken `PHASE_DEADLINE` seconds: no
    phase can hang the run."""
    try:
        return await asyncio.wait_for(phase, PHASE_DEADLINE)
    except asyncio.TimeoutError:
        raise RuntimeError(f"a phase took over {PHASE_DEADLINE:.0f} s") from None


def table(phases: list[Phase]) -> str:
    """A Markdown table of one mode's phases."""
    lines = [
        "| phase | connections | full collections | their pauses, ms | mean pause, ms"
        " | longest so far, ms | frozen objects | RSS, MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        mean = f"{1e3 * p.pause_seconds / p.full_collections:.0f}" if p.full_collections else "-"
        lines.append(
            f"| {p.name} | {p.connections} | {p.full_collections} | {1e3 * p.pause_seconds:.0f}"
            f" | {mean} | {1e3 * p.longest_pause:.0f} | {p.frozen_objects:,}"
            f" | {p.rss_kib / 1024:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both modes and print their tables and the ratio of their longest pauses."""
    parser = argparse.ArgumentParser(prog="python -m bench.gcpauses", description=__doc__)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=6, help="growth in this many steps")
    parser.add_argument("--storms", type=int, default=2)
    args = parser.parse_args(argv)
    if args.connections < 2 or args.steps < 1 or args.storms < 0:
        parser.error("--connections >= 2, --steps >= 1, --storms >= 0")
    results = {}
    for freeze in (False, True):
        phases = asyncio.run(run_mode(freeze, args.connections, args.steps, args.storms))
        results[freeze] = phases
        title = "--gc-freeze (the default)" if freeze else "--no-gc-freeze (CPython's collector)"
        print(f"\n### {title}\n\n{table(phases)}")
    print()
    print(summary(results[False], results[True]))


def summary(plain: list[Phase], frozen: list[Phase]) -> str:
    """Time paused during the storms, and the longest pause, of both modes, as ratios."""

    def storms(phases: list[Phase]) -> tuple[float, int]:
        during = [p for p in phases if p.name.startswith("storm")]
        return sum(p.pause_seconds for p in during), sum(p.full_collections for p in during)

    (plain_paused, plain_count), (frozen_paused, frozen_count) = storms(plain), storms(frozen)
    lines = []
    if plain_count and frozen_count:
        lines.append(
            f"During the storms: {1e3 * plain_paused:.0f} ms in {plain_count} full collections"
            f" without freezing, {1e3 * frozen_paused:.0f} ms in {frozen_count} with"
            f" ({plain_paused / max(frozen_paused, 1e-9):.1f}x less time paused; mean pause"
            f" {1e3 * plain_paused / plain_count:.0f} ms against"
            f" {1e3 * frozen_paused / frozen_count:.0f})."
        )
    lines.append(
        f"Longest pause of the run: {1e3 * plain[-1].longest_pause:.0f} ms without freezing,"
        f" {1e3 * frozen[-1].longest_pause:.0f} ms with (a thaw's whole collection, each"
        " time the heap has doubled, is as long as an unfrozen one)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
