"""The client side: subscriber processes, the sender, and a stalled raw-TCP client.

The sender writes ``{"message": "~K~T~pad"}`` where K is its own counter (0, 1, 2, ...) and
T its send time (``time.time_ns()``, the same clock for every process of the machine). A
subscriber finds K and T in whatever JSON the server wraps around the text, so latency is
receive time - T, and loss, duplicates and order are judged on K for every server alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

CONNECT_TIMEOUT = 20.0
CONNECT_CONCURRENCY = 50
QUIET_AFTER_FINISH = 1.5
"""Seconds without a new frame after which a subscriber stops waiting for missing ones."""
MAX_MESSAGES = 100_000
POLL_INTERVAL = 0.0005


@dataclass
class Tally:
    """What one subscriber connection received of the sender's messages."""

    seen: bytearray
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    highest: int = -1
    closed: bool = False

    def unique(self) -> int:
        return self.received - self.duplicates


@dataclass
class Shared:
    """Messages received so far (unique, open connections only) per subscriber process.

    Shared-memory arrays of signed 64-bit counters, one slot per process (one writer each),
    that the sender reads to keep the end-to-end number of messages in flight bounded.
    """

    progress: Any
    live: Any
    """Open subscriber connections per process (same layout as ``progress``)."""
    slot: int
    connect_concurrency: int = CONNECT_CONCURRENCY
    """Handshakes this process runs at once."""


@dataclass
class WorkerReport:
    """One subscriber process's result, sent back to the harness through its pipe."""

    connections: int
    failed_connects: int
    received: int
    unique: int
    duplicates: int
    out_of_order: int
    lost: int
    closed_early: int
    last_receive_ns: int
    latencies_us: array[int] = field(default_factory=lambda: array("q"))
    lost_per_connection_max: int = 0


def _parse(text: str) -> tuple[int, int] | None:
    parts = text.split("~", 3)
    if len(parts) < 4:
        return None  # a join, a leave or anything else that is not the sender's
    try:
        return int(parts[1]), int(parts[2])
    except ValueError:
        return None


async def _receive(
    ws: ClientConnection, tally: Tally, latencies: array[int], last: list[int], shared: Shared
) -> None:
    seen = tally.seen
    try:
        async for text in ws:
            now = time.time_ns()
            if not isinstance(text, str):
                continue
            parsed = _parse(text)
            if parsed is None:
                continue
            counter, sent_ns = parsed
            if not 0 <= counter < len(seen):
                continue
            tally.received += 1
            last[0] = now
            if seen[counter]:
                tally.duplicates += 1
                continue
            seen[counter] = 1
            shared.progress[shared.slot] += 1
            if counter < tally.highest:
                tally.out_of_order += 1
            else:
                tally.highest = counter
            latencies.append((now - sent_ns) // 1000)
    except (ConnectionClosed, OSError):
        pass
    finally:
        # A closed connection stops counting: the sender waits for the live ones only.
        shared.progress[shared.slot] -= tally.unique()
        shared.live[shared.slot] -= 1
    tally.closed = True  # by the server or the network, not by the harness's cancel


async def _open(url: str, semaphore: asyncio.Semaphore) -> ClientConnection | None:
    async with semaphore:
        try:
            return await connect(
                url,
                compression=None,
                open_timeout=CONNECT_TIMEOUT,
                ping_interval=None,
                close_timeout=1,
                max_size=2**20,
            )
        except (OSError, WebSocketException, asyncio.TimeoutError):
            return None


async def _subscriber_main(
    pipe: Pipe, urls: list[str], messages: int, deadline_s: float, shared: Shared
) -> None:
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(shared.connect_concurrency)
    opened = await asyncio.gather(*(_open(url, semaphore) for url in urls))
    sockets = [ws for ws in opened if ws is not None]
    tallies = [Tally(bytearray(messages)) for _ in sockets]
    shared.live[shared.slot] = len(sockets)
    latencies: array[int] = array("q")
    last = [0]
    tasks = [
        asyncio.create_task(_receive(ws, tally, latencies, last, shared))
        for ws, tally in zip(sockets, tallies, strict=True)
    ]
    pipe.send(("ready", len(sockets), len(urls) - len(sockets)))
    try:
        # ("finish", sent): the sender is done; wait for the frames still on their way.
        command = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), deadline_s)
        sent = int(command[1])
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if all(t.unique() >= sent or t.closed for t in tallies):
                break
            if time.time_ns() - max(last[0], command[2]) > QUIET_AFTER_FINISH * 1e9:
                break
            await asyncio.sleep(0.02)
    except (asyncio.TimeoutError, EOFError):
        sent = messages
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lost = [sent - sum(t.seen[:sent]) for t in tallies]
    report = WorkerReport(
        connections=len(sockets),
        failed_connects=len(urls) - len(sockets),
        received=sum(t.received for t in tallies),
        unique=sum(t.unique() for t in tallies),
        duplicates=sum(t.duplicates for t in tallies),
        out_of_order=sum(t.out_of_order for t in tallies),
        lost=sum(lost),
        closed_early=sum(1 for t in tallies if t.closed),
        last_receive_ns=last[0],
        latencies_us=latencies,
        lost_per_connection_max=max(lost, default=0),
    )
    pipe.send(("report", report))
    await asyncio.gather(*(_close(ws) for ws in sockets))


async def _close(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 2)


def subscriber_process(
    pipe: Pipe, urls: list[str], messages: int, deadline_s: float, shared: Shared
) -> None:
    """Entry point of one subscriber process: hold ``urls`` open, tally, report, exit."""
    main = _subscriber_main(pipe, urls, messages, deadline_s, shared)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


@dataclass
class SendResult:
    """What the sender managed to send."""

    sent: int
    first_send_ns: int
    last_send_ns: int
    froze: bool
    """The server stopped echoing the sender's messages back (it is stuck)."""


async def send_messages(
    url: str,
    messages: int,
    *,
    received: Callable[[], float],
    window: int,
    pad: int,
    stall_timeout: float,
) -> SendResult:
    """Send ``messages`` messages, at most ``window`` ahead of the subscribers.

    ``received()`` is the number of messages the subscribers have received so far, on
    average: waiting until it is within ``window`` of what was sent keeps a bounded number of
    messages in flight end to end (a closed loop that runs at the speed of the server and its
    clients). If it does not move for ``stall_timeout`` seconds the server is stuck: stop.
    The sender is in the room too and reads (and discards) its own messages coming back.
    """
    messages = min(messages, MAX_MESSAGES)
    padding = "x" * pad
    async with connect(
        url, compression=None, open_timeout=CONNECT_TIMEOUT, ping_interval=None, close_timeout=1
    ) as ws:

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

        echo_task = asyncio.create_task(drain())
        sent = 0
        froze = False
        first = time.time_ns()
        try:
            while sent < messages:
                froze = not await _wait_for_progress(received, sent - window + 1, stall_timeout)
                if froze or echo_task.done():
                    froze = True
                    break
                text = f"~{sent}~{time.time_ns()}~{padding}"
                await ws.send(json.dumps({"message": text}))
                sent += 1
            last = time.time_ns()
            if not froze:  # stay connected until the subscribers have (nearly) everything
                await _wait_for_progress(received, sent - 0.5, stall_timeout)
        finally:
            echo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await echo_task
            if froze:
                # A stuck server never answers the close handshake: don't wait for it.
                ws.transport.abort()
    return SendResult(sent, first, last, froze)


async def warm_up(url: str) -> None:
    """Connect, send one message, read it back and leave: code paths and pools warmed up.

    Run before the idle-memory baseline so the first connection's one-off costs (lazy
    imports, caches) are not counted as memory per connection.
    """
    async with connect(
        url, compression=None, open_timeout=CONNECT_TIMEOUT, ping_interval=None, close_timeout=1
    ) as ws:
        await ws.send(json.dumps({"message": "~warm-up~0~"}))

        async def echo() -> None:
            async for text in ws:
                if isinstance(text, str) and "warm-up" in text:
                    return

        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
            await asyncio.wait_for(echo(), 5)


async def _wait_for_progress(received: Callable[[], float], goal: float, limit: float) -> bool:
    """Wait until ``received() >= goal``; False if it stopped moving for ``limit`` seconds."""
    value = received()
    moved = time.monotonic()
    while value < goal:
        await asyncio.sleep(POLL_INTERVAL)
        now = received()
        if now != value:
            value, moved = now, time.monotonic()
        elif time.monotonic() - moved > limit:
            return False
    return True


def open_stalled_client(host: str, port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A raw TCP client that completes the WebSocket handshake and then never reads.

    Its small ``SO_RCVBUF`` (set before connecting, so the TCP window is small) makes the
    server's writes to it back up quickly. Close the socket to end it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(CONNECT_TIMEOUT)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response and len(response) < 65536:
        chunk = sock.recv(1)  # byte by byte: read nothing past the handshake
        if not chunk:
            break
        response += chunk
    if not response.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise RuntimeError(f"stalled client's handshake failed: {response[:80]!r}")
    return sock


def report_to_dict(report: WorkerReport) -> dict[str, Any]:
    """A report without its latencies, for logs."""
    return {k: v for k, v in vars(report).items() if k != "latencies_us"}
