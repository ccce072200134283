"""The chat app's edge against an outside attacker, on every server it offers.

Raw sockets over loopback against ``python -m examples.chat_app`` in a subprocess: request
heads that never end or never stop growing, a client that floods pings and never reads, a
client that stops reading while the server shuts down. Every loop is bounded in count and
time and stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.chat_app.rawsock import memory_kib, raw_websocket, upgrade_request

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server("--handshake-timeout", "1", kind=server_kind)


def metric(server: ChatServer, name: str) -> int:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return int(match.group(1))


def read_until_closed(sock: socket.socket, deadline: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset).

    Fails if the connection is still open after ``deadline`` seconds.
    """
    sock.settimeout(deadline)
    received = b""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open; it sent {received[:200]!r}")


def test_a_dribbled_request_head_is_cut_at_the_handshake_deadline(server: ChatServer) -> None:
    """20 clients send a header byte every 0.2 s: each is closed soon after 1 s (the
    --handshake-timeout), not kept for as long as it dribbles."""
    sockets = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /ws/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)
        open_ = list(sockets)
        # Bounded: 150 rounds of 0.2 s (30 s) at most; a round ends early on any close.
        for _ in range(150):
            if not open_:
                break
            readable, _, _ = select.select(open_, [], [], 0.2)
            for sock in readable:
                with contextlib.suppress(ConnectionResetError):
                    while sock.recv(65536):
                        pass
                open_.remove(sock)
            for sock in open_:
                with contextlib.suppress(OSError):
                    sock.send(b"a")
        assert not open_, f"{len(open_)} of 20 dribbling clients still connected after 30 s"
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/ws/long?room=lobby&pad=" + "p" * 9000, "", 414),  # request line over 8 KiB
        ("/ws/many", "".join(f"X-Header-{n}: {n}\r\n" for n in range(200)), 431),
        ("/ws/big", f"X-Big: {'b' * 32768}\r\n", 431),  # one header over every limit
    ],
    ids=["long-request-line", "many-headers", "huge-header"],
)
def test_an_oversized_upgrade_request_gets_its_status_and_is_closed(
    server: ChatServer, path: str, headers: str, status: int
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(upgrade_request(server.port, path, headers))
        response = read_until_closed(sock)
    assert response.startswith(f"HTTP/1.1 {status} ".encode()), response[:200]


def test_megabytes_of_small_headers_are_refused_early(server: ChatServer) -> None:
    """32 MiB of small headers: the server answers 431 after the first few KiB instead of
    holding them all, so its memory does not grow with them."""
    assert server.process is not None
    rss_before = memory_kib(server.process.pid)
    line = b"X-Filler: " + b"f" * 50 + b"\r\n"
    chunk = line * (65536 // len(line))
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /ws/headers HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with contextlib.suppress(OSError):  # reset or broken pipe once the server closed
            while sent < 32 * MIB:  # bounded: 512 chunks of 64 KiB
                sock.sendall(chunk)
                sent += len(chunk)
        response = read_until_closed(sock)
    rss_after = memory_kib(server.process.pid)
    # uvicorn stops reading (the send fails early); websockets answers 431, half-closes and
    # discards what follows: memory is bounded either way.
    assert response.startswith(b"HTTP/1.1 431 "), response[:200]
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after)


def _ping_frames(size: int) -> bytes:
    """Masked ping frames with 125-byte payloads (the most a control frame may carry), about
    ``size`` bytes of them; the mask key is zero, so the payload goes as is."""
    frame = b"\x89" + bytes([0x80 | 125]) + b"\x00\x00\x00\x00" + b"p" * 125
    return frame * (size // len(frame))


@pytest.mark.parametrize("kind", ["uvicorn", "websockets"])
def test_a_ping_flood_that_never_reads_is_closed_and_memory_stays_bounded(
    start_server: StartServer, kind: str
) -> None:
    """64 MiB of pings from a client that never reads its pongs: the connection is closed
    once --max-write-buffer (1 MiB here) is waiting for it, and the server's resident memory
    grows by far less than what was sent."""
    node = start_server("--max-write-buffer", str(MIB), "--send-buffer", "65536", kind=kind)
    assert node.process is not None
    pid = node.process.pid
    sock = raw_websocket(node.port, "/ws/pinger?room=pings")
    rss_before = memory_kib(pid)
    rss_peak = rss_before
    chunk = _ping_frames(MIB)
    sent = 0
    try:
        sock.settimeout(5)  # a send that cannot go on for 5 s: the server stopped reading
        with contextlib.suppress(OSError):
            for _ in range(64):  # bounded: 64 MiB at most
                sock.sendall(chunk)
                sent += len(chunk)
                rss_peak = max(rss_peak, memory_kib(pid))
        read_until_closed(sock, deadline=30)
    finally:
        sock.close()
    hwm_after = memory_kib(pid, "VmHWM")
    growth = max(rss_peak, hwm_after) - rss_before
    print(  # the figures, for the report (pytest -s)
        f"{kind}: sent {sent / MIB:.0f} MiB of pings; VmRSS before {rss_before} KiB, peak"
        f" sampled {rss_peak} KiB, VmHWM after {hwm_after} KiB: growth {growth} KiB"
    )
    assert growth < 16 * 1024, (kind, sent, rss_before, rss_peak, hwm_after)
    assert metric(node, "chat_write_buffer_overflows_total") == 1
    assert "Traceback" not in node.stderr()
    node.stop()


@pytest.mark.parametrize("kind", ["uvicorn", "uvicorn-asgi", "websockets"])
def test_shutdown_with_a_stalled_client_finishes_in_bounded_time(
    start_server: StartServer, kind: str
) -> None:
    """A raw client that never reads, with megabytes queued for it: SIGTERM still ends the
    server (within --shutdown-timeout and the close waits), exit status 0, no traceback."""
    node = start_server(
        "--rate-limit", "0", "--queue-size", "100000", "--max-write-buffer", str(64 * MIB),
        "--send-buffer", "65536", "--shutdown-timeout", "3", kind=kind,
    )  # fmt: skip
    assert node.process is not None
    stalled = raw_websocket(node.port, "/ws/stalled?room=stall")
    try:
        from websockets.sync.client import connect

        text = "x" * 3900
        with connect(f"{node.ws_url}/ws/sender?room=stall") as sender:
            sender.recv(timeout=10)  # its join
            for n in range(600):  # about 2.4 MB for the stalled client
                sender.send(json.dumps({"message": f"{n} {text}"}))
                while (frame := json.loads(sender.recv(timeout=10)))["type"] != "message":
                    assert frame["type"] != "error", frame
            node.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                while True:  # until the server closes it
                    sender.recv(timeout=30)
        try:
            status = node.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{kind}: still running 40 s after SIGTERM")
    finally:
        stalled.close()
    assert status == 0
    assert "Traceback" not in node.stderr()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_exits_0_without_a_traceback(
    start_server: StartServer, server_kind: str, signum: signal.Signals
) -> None:
    node = start_server(kind=server_kind)
    assert node.process is not None
    node.process.send_signal(signum)
    assert node.process.wait(timeout=30) == 0
    log = node.stderr()
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log


LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*"
)


def test_every_log_line_has_its_level_and_logger(server: ChatServer) -> None:
    """Runs after the others in this module: whatever they made the server log."""
    httpx.get(f"{server.url}/healthz")
    log = server.stderr()
    assert server.ready_line in log
    for line in log.splitlines():
        assert LOG_LINE.fullmatch(line), line
