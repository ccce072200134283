"""The client side: subscriber processes, the sender, and a stalled raw-TCP client.

The sender sends message i to room R = i mod ROOMS (one sender connection per room) with
the text ``~K~T~R~pad``, where K = i div ROOMS is the room's own counter (0, 1, 2, ...) and T
the send time (``time.time_ns()``, the same clock for every process of the machine). A
subscriber finds K, T and R in whatever the server wraps around the text, so latency is
receive time - T, loss, duplicates and order are judged on K against the messages sent to
the subscriber's own room, and a frame whose R is another room is a wrong-room delivery, for
every server alike. With one room (fan-out, stall) K is the sender's counter and R is 0.
How a client speaks to each server is in ``bench/protocols.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
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

from .protocols import PROTOCOLS, Plain, ProtocolError

CONNECT_TIMEOUT = 20.0
CONNECT_CONCURRENCY = 50
QUIET_AFTER_FINISH = 1.5
"""Seconds without a new frame after which a subscriber stops waiting for missing ones."""
MAX_MESSAGES = 100_000
POLL_INTERVAL = 0.0005
MAX_STALLED_HANDSHAKE_FRAMES = 10


def sent_to_room(sent: int, rooms: int, room: int) -> int:
    """How many of the first ``sent`` messages, dealt round-robin over rooms, went to ``room``."""
    return max(0, (sent - room + rooms - 1) // rooms)


@dataclass
class Tally:
    """What one subscriber connection received of the sender's messages."""

    seen: bytearray
    room: int = 0
    """The index of the subscriber's room (the R of the messages it should receive)."""
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    wrong_room: int = 0
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
    expected: int
    """Messages sent to the rooms of the connected subscribers, summed over them."""
    received: int
    unique: int
    duplicates: int
    out_of_order: int
    lost: int
    wrong_room: int
    closed_early: int
    last_receive_ns: int
    latencies_us: array[int] = field(default_factory=lambda: array("q"))
    lost_per_connection_max: int = 0


def message_text(counter: int, room: int, pad: str) -> str:
    """The sender's text for the ``counter``-th message of room ``room`` (see the module)."""
    return f"~{counter}~{time.time_ns()}~{room}~{pad}"


def parse(text: str) -> tuple[int, int, int] | None:
    """K, T and R from a frame that holds the sender's text; None for any other frame."""
    parts = text.split("~", 4)
    if len(parts) < 5:
        return None  # a join, a leave or anything else that is not the sender's
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


async def _receive(
    ws: ClientConnection,
    protocol: Plain,
    tally: Tally,
    latencies: array[int],
    last: list[int],
    shared: Shared,
) -> None:
    seen = tally.seen
    ping, prefix = protocol.ping, protocol.message_prefix
    try:
        async for text in ws:
            now = time.time_ns()
            if not isinstance(text, str):
                continue
            if text == ping:
                await ws.send(protocol.pong)
                continue
            if not text.startswith(prefix):
                continue
            parsed = parse(text)
            if parsed is None:
                continue
            counter, sent_ns, room = parsed
            if room != tally.room:
                tally.wrong_room += 1
                continue
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


async def open_client(url: str, protocol: Plain) -> ClientConnection:
    """A client connection that has completed the protocol's handshake (in its room)."""
    ws = await connect(
        url,
        compression=None,
        open_timeout=CONNECT_TIMEOUT,
        ping_interval=None,
        close_timeout=1,
        max_size=2**20,
    )
    try:
        await protocol.join(ws)
    except BaseException:
        ws.transport.abort()
        raise
    return ws


async def _open(url: str, protocol: Plain, semaphore: asyncio.Semaphore) -> ClientConnection | None:
    async with semaphore:
        try:
            return await open_client(url, protocol)
        except (OSError, WebSocketException, ProtocolError, asyncio.TimeoutError):
            return None


async def _subscriber_main(
    pipe: Pipe,
    subscriptions: list[tuple[str, int]],
    rooms: int,
    messages: int,
    deadline_s: float,
    shared: Shared,
    protocol_name: str,
) -> None:
    loop = asyncio.get_running_loop()
    protocol = PROTOCOLS[protocol_name]
    semaphore = asyncio.Semaphore(shared.connect_concurrency)
    opened = await asyncio.gather(*(_open(url, protocol, semaphore) for url, _ in subscriptions))
    pairs = [(ws, room) for ws, (_, room) in zip(opened, subscriptions, strict=True) if ws]
    sockets = [ws for ws, _ in pairs]
    tallies = [Tally(bytearray(messages), room) for _, room in pairs]
    shared.live[shared.slot] = len(sockets)
    latencies: array[int] = array("q")
    last = [0]
    tasks = [
        asyncio.create_task(_receive(ws, protocol, tally, latencies, last, shared))
        for ws, tally in zip(sockets, tallies, strict=True)
    ]
    pipe.send(("ready", len(sockets), len(subscriptions) - len(sockets)))
    try:
        # ("finish", sent): the sender is done; wait for the frames still on their way.
        command = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), deadline_s)
        sent = int(command[1])
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if all(t.unique() >= sent_to_room(sent, rooms, t.room) or t.closed for t in tallies):
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
    expected = [sent_to_room(sent, rooms, t.room) for t in tallies]
    lost = [n - sum(t.seen[:n]) for n, t in zip(expected, tallies, strict=True)]
    report = WorkerReport(
        connections=len(sockets),
        failed_connects=len(subscriptions) - len(sockets),
        expected=sum(expected),
        received=sum(t.received for t in tallies),
        unique=sum(t.unique() for t in tallies),
        duplicates=sum(t.duplicates for t in tallies),
        out_of_order=sum(t.out_of_order for t in tallies),
        lost=sum(lost),
        wrong_room=sum(t.wrong_room for t in tallies),
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
    pipe: Pipe,
    subscriptions: list[tuple[str, int]],
    rooms: int,
    messages: int,
    deadline_s: float,
    shared: Shared,
    protocol_name: str = "plain",
) -> None:
    """Entry point of one subscriber process: hold each ``(url, room index)`` open, tally,
    report, exit. ``rooms``: how many rooms the sender deals its messages over."""
    main = _subscriber_main(pipe, subscriptions, rooms, messages, deadline_s, shared, protocol_name)
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
    urls: list[str],
    messages: int,
    *,
    received: Callable[[], float],
    window: int,
    pad: int,
    stall_timeout: float,
    protocol: Plain | None = None,
) -> SendResult:
    """Send ``messages`` messages round-robin over ``urls`` (one connection per room), at most
    ``window`` ahead of the subscribers.

    Message i goes out on connection i mod len(urls) (room R) as the room's message
    i div len(urls). ``received()`` is the number of messages the subscribers have received
    so far, on average (with several rooms, scaled to messages sent in all rooms): waiting
    until it is within ``window`` of what was sent keeps a bounded number of messages in
    flight end to end (a closed loop that runs at the speed of the server and its clients).
    If it does not move for ``stall_timeout`` seconds the server is stuck: stop. The sender
    is in each room too and reads (and discards) its own messages coming back.
    """
    protocol = protocol or PROTOCOLS["plain"]
    messages = min(messages, MAX_MESSAGES)
    padding = "x" * pad
    rooms = len(urls)
    sockets: list[ClientConnection] = []
    drains: list[asyncio.Task[None]] = []

    async def drain(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                if frame == protocol.ping:
                    await ws.send(protocol.pong)

    sent = 0
    froze = False
    first = last = time.time_ns()
    try:
        for url in urls:
            sockets.append(await open_client(url, protocol))
            drains.append(asyncio.create_task(drain(sockets[-1])))
        first = time.time_ns()
        while sent < messages:
            froze = not await _wait_for_progress(received, sent - window + 1, stall_timeout)
            if froze or any(task.done() for task in drains):
                froze = True
                break
            room = sent % rooms
            text = message_text(sent // rooms, room, padding)
            await sockets[room].send(protocol.encode(text))
            sent += 1
        last = time.time_ns()
        if not froze:  # stay connected until the subscribers have (nearly) everything
            await _wait_for_progress(received, sent - 0.5, stall_timeout)
    finally:
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
        for ws in sockets:
            if froze:
                # A stuck server never answers the close handshake: don't wait for it.
                ws.transport.abort()
            else:
                await _close(ws)
    return SendResult(sent, first, last, froze)


async def warm_up(url: str, protocol: Plain | None = None) -> None:
    """Connect, send one message, read it back and leave: code paths and pools warmed up.

    Run before the idle-memory baseline so the first connection's one-off costs (lazy
    imports, caches) are not counted as memory per connection.
    """
    protocol = protocol or PROTOCOLS["plain"]
    ws = await open_client(url, protocol)
    try:
        await ws.send(protocol.encode("~warm-up~0~0~"))

        async def echo() -> None:
            async for text in ws:
                if isinstance(text, str) and "warm-up" in text:
                    return

        with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
            await asyncio.wait_for(echo(), 5)
    finally:
        await _close(ws)


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


def open_stalled_client(
    host: str, port: int, path: str, rcvbuf: int = 4096, protocol: Plain | None = None
) -> socket.socket:
    """A raw TCP client that completes the handshake, joins its room and then never reads.

    Its small ``SO_RCVBUF`` (set before connecting, so the TCP window is small) makes the
    server's writes to it back up quickly. After the WebSocket handshake it sends the
    protocol's join frames (Socket.IO: ``40``, masked as a client must) and reads the server's
    frames up to the join's reply, so it is in the room for sure; then it reads nothing more.
    Close the socket to end it.
    """
    protocol = protocol or PROTOCOLS["plain"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13"
            "\r\n\r\n"
        )
        sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response and len(response) < 65536:
            chunk = sock.recv(1)  # byte by byte: read nothing past the handshake
            if not chunk:
                break
            response += chunk
        if not response.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"stalled client's handshake failed: {response[:80]!r}")
        for frame in protocol.raw_join:
            sock.sendall(masked_text_frame(frame))
        if protocol.joined_prefix is not None:
            for _ in range(MAX_STALLED_HANDSHAKE_FRAMES):
                text = _read_text_frame(sock)
                if text.startswith(protocol.joined_prefix):
                    break
            else:
                raise RuntimeError("stalled client: no reply to its join")
    except BaseException:
        sock.close()
        raise
    return sock


def masked_text_frame(text: str) -> bytes:
    """One final text frame as a client sends it (RFC 6455: masked), payload < 64 KiB."""
    payload = text.encode()
    if len(payload) >= 65536:
        raise ValueError("frame too long")
    mask = os.urandom(4)
    length = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0xFE])
    if len(payload) >= 126:
        length += len(payload).to_bytes(2, "big")
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return b"\x81" + length + mask + masked


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("stalled client: the server closed the connection")
        data += chunk
    return data


def _read_text_frame(sock: socket.socket) -> str:
    """Read exactly one unmasked, unfragmented frame from a server; its payload as text."""
    first, second = _recv_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(_recv_exactly(sock, 2), "big")
    elif length == 127:
        length = int.from_bytes(_recv_exactly(sock, 8), "big")
    if second & 0x80 or (first & 0x0F) not in (1, 2) or not first & 0x80 or length > 65536:
        raise RuntimeError(f"stalled client: unexpected frame header {first:#x} {second:#x}")
    return _recv_exactly(sock, length).decode(errors="replace")


def report_to_dict(report: WorkerReport) -> dict[str, Any]:
    """A report without its latencies, for logs."""
    return {k: v for k, v in vars(report).items() if k != "latencies_us"}
