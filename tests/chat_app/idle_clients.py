"""Idle chat clients in a process of their own, for measuring what they cost the server.

``python -m tests.chat_app.idle_clients PORT`` reads commands on stdin:

- ``open PREFIX N``: connect N clients (``PREFIX0`` ...) to the room ``lobby`` one after
  the other, each once the previous one has its personal stream's ``joined``; then wait
  until every client opened so far has read the last one's ``join`` (the server has
  nothing left to write), and print ``ok``;
- end of input: close them all.

The clients read everything the server sends (so that nothing waits in its buffers) and
send nothing after the handshake. Raw sockets and one thread, so that nothing of theirs runs
in the server's process.
"""

from __future__ import annotations

import selectors
import socket
import sys

_REQUEST = (
    "GET /ws/{client_id}?room=lobby HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)


class _Clients:
    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytearray] = {}

    def open(self, prefix: str, count: int) -> None:
        for n in range(count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            sock.sendall(_REQUEST.format(client_id=f"{prefix}{n}").encode())
            sock.setblocking(False)
            self.received[sock] = bytearray()
            self.selector.register(sock, selectors.EVENT_READ)
            self._wait_for(b'"type":"joined"', {sock})
        self._wait_for(f'"client_id":"{prefix}{count - 1}"'.encode(), set(self.received))

    def _wait_for(self, needle: bytes, sockets: set[socket.socket]) -> None:
        """Read every socket until each of ``sockets`` has received ``needle``."""
        pending = {sock for sock in sockets if needle not in self.received[sock]}
        while pending:
            events = self.selector.select(timeout=30)
            if not events:
                raise TimeoutError("the server sent nothing for 30 s")
            for key, _ in events:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed a connection")
                data = self.received[sock]
                start = max(0, len(data) - len(needle))
                data += chunk
                if sock in pending and data.find(needle, start) != -1:
                    pending.discard(sock)

    def close(self) -> None:
        for sock in self.received:
            sock.close()


def main() -> None:
    clients = _Clients(int(sys.argv[1]))
    try:
        for line in sys.stdin:
            command, prefix, count = line.split()
            assert command == "open", command
            clients.open(prefix, int(count))
            print("ok", flush=True)
    finally:
        clients.close()


if __name__ == "__main__":
    main()
