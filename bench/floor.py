"""The floor under a delivery: CPU per ``send()`` of a chat-sized frame on loopback TCP.

``python -m bench.floor`` writes 200,000 frames of 250 bytes to a TCP socket on 127.0.0.1
whose reader, in another process, reads as fast as it can, and prints the sender's CPU per
send (user and system). A chat's write to a sleeping client costs more (the kernel wakes
the reader in the sender's call); this is the cost with no wake-up at all. See
docs/performance.md.
"""

from __future__ import annotations

import multiprocessing
import resource
import socket
import time

FRAME_BYTES = 250
FRAMES = 200_000


def _read(port: int, total: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = 0
        while got < total:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            got += len(chunk)


def measure(frames: int = FRAMES, size: int = FRAME_BYTES) -> tuple[float, float, float]:
    """User and system CPU µs per send, and wall µs per send."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reader = multiprocessing.Process(target=_read, args=(port, frames * size))
        reader.start()
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b"x" * size
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(frames):
                conn.sendall(data)
            after, end = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        reader.join(timeout=30)
    user = (after.ru_utime - before.ru_utime) / frames * 1e6
    system = (after.ru_stime - before.ru_stime) / frames * 1e6
    return user, system, (end - start) / frames * 1e6


def main() -> None:
    user, system, wall = measure()
    print(
        f"send() of {FRAME_BYTES} B on loopback: {user + system:.2f} us CPU per send"
        f" (user {user:.2f}, system {system:.2f}); wall {wall:.2f} us"
    )


if __name__ == "__main__":
    main()
