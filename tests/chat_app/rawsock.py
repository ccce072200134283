"""Raw-socket helpers for the chat app's edge tests: a hand-made WebSocket handshake, and
memory figures of the server process."""

from __future__ import annotations

import base64
import os
import socket
from pathlib import Path


def upgrade_request(port: int, path: str, extra_headers: str = "") -> bytes:
    """A WebSocket upgrade request for ``path``, as bytes to write on a raw socket."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    ).encode()


def raw_websocket(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A raw TCP socket that did the WebSocket handshake by hand and read nothing more.

    Its small receive buffer makes what the server writes to it back up quickly once it
    stops reading. The response is read one byte at a time so that no frame is consumed.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(upgrade_request(port, path))
        response = b""
        while not response.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, "the server closed during the handshake"
            response += byte
        assert response.startswith(b"HTTP/1.1 101"), response
    except BaseException:
        sock.close()
        raise
    return sock


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from ``/proc/<pid>/status`` (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")
