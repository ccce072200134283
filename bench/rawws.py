"""A minimal WebSocket client on an asyncio ``Protocol``, for the open-loop load generator.

Why not the ``websockets`` client that the closed loop uses: an open loop at 200k deliveries/s
on 2 cores, one of them the server's, leaves the client side a few µs per received frame, and
the ``websockets`` client's path per frame (frame objects, UTF-8 decoding, an assembler, a
task woken per message) costs several times that. This client parses the frames in each chunk
the event loop hands it, in place, and passes each text payload as ``bytes`` to a callback with
one receive timestamp per chunk; it writes prepared (masked) frames, several at a time.

It speaks RFC 6455 as far as the servers under test need: the opening handshake, unfragmented
text frames in both directions, ping (answered), close; and the protocols' joins
(``bench/protocols.py``: Socket.IO's ``40`` and its reply, its ``2``/``3`` ping). No
compression, no fragmentation, no TLS: 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from collections.abc import Callable
from typing import cast

from .protocols import Plain

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C speedups are in every websockets wheel
    from websockets.utils import apply_mask

HANDSHAKE_TIMEOUT = 20.0
MAX_HEADER_BYTES = 65536
OnText = Callable[[bytes, int], None]
"""Called with a text frame's payload and the ``time.time_ns()`` of the chunk it came in."""


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final frame as a client must send it (masked; the key needs no secrecy here)."""
    mask = random.getrandbits(32).to_bytes(4, "big")
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, 0xFE]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0xFF]) + size.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


class RawClient(asyncio.Protocol):
    """One client connection: handshake, the protocol's join, then frames to ``on_text``.

    `ready` resolves once the client is in its room (or fails); `closed` once
    the connection is gone. Text frames before the join completes are the protocol's own and
    are not passed on; the protocol's ping text (Socket.IO's ``2``) is answered, never passed.
    """

    def __init__(
        self, host: str, port: int, path: str, protocol: Plain, on_text: OnText | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._protocol = protocol
        self._on_text = on_text
        self._ping = protocol.ping.encode() if protocol.ping is not None else None
        self._pong = client_frame(protocol.pong.encode())
        self._joined_prefix = (
            protocol.joined_prefix.encode() if protocol.joined_prefix is not None else None
        )
        self._upgraded = False
        self._joined = False
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before joining: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, frames: bytes) -> None:
        """Write prepared frames (see `client_frame`); never waits (open loop)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames)

    def close(self) -> None:
        """Send a close frame and close the transport once its buffer is written."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(b"\x03\xe8", 0x8))
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self, data: bytes) -> bytes | None:
        """Consume the HTTP response; the bytes after it (None: not complete yet)."""
        data = self._pending + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEADER_BYTES:
                self._fail("handshake response too long")
            self._pending = data
            return None
        self._pending = b""
        if not data.startswith(b"HTTP/1.1 101"):
            self._fail(f"handshake refused: {data[:80]!r}")
            return None
        self._upgraded = True
        for text in self._protocol.raw_join:
            self.write(client_frame(text.encode()))
        if self._joined_prefix is None:
            self._join()
        return data[end + 4 :]

    def _join(self) -> None:
        self._joined = True
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self.abort()

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if not self._upgraded:
            rest = self._handshake(data)
            if not rest:
                return
            data = rest
        if self._pending:
            data = self._pending + data
        size = len(data)
        pos = 0
        on_text, ping = self._on_text, self._ping
        while size - pos >= 2:
            length = data[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            opcode = data[pos] & 0x0F
            payload = data[pos + head : end]
            pos = end
            if opcode == 0x1:
                if payload == ping:
                    self.write(self._pong)
                elif self._joined:
                    if on_text is not None:
                        on_text(payload, now)
                elif self._joined_prefix is not None and payload.startswith(self._joined_prefix):
                    self._join()
            elif opcode == 0x9:
                self.write(client_frame(payload, 0xA))
            elif opcode == 0x8:
                self.close()
                break
        self._pending = data[pos:] if pos < size else b""


async def open_raw(
    host: str, port: int, path: str, protocol: Plain, on_text: OnText | None = None
) -> RawClient:
    """A `RawClient` connected and in its room, or an exception (bounded in time)."""
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: RawClient(host, port, path, protocol, on_text), host, port),
        HANDSHAKE_TIMEOUT,
    )
    try:
        await asyncio.wait_for(asyncio.shield(client.ready), HANDSHAKE_TIMEOUT)
    except BaseException:
        client.abort()
        raise
    return client
