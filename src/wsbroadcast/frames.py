"""WebSocket frames built once and written to many sockets (RFC 6455, section 5.2).

Frames a server sends are not masked, so a text frame's bytes are the same for every
recipient whose connection negotiated no extension (such as permessage-deflate). A transport
that can write raw frames (see `BatchTransport`) then writes the one prepared frame of a
message to every socket, and a connection's pending frames in one write. This module is
sans-I/O and knows only bytes: it builds frames and imports nothing of wsbroadcast
(but for its deprecated `frames_bytes`, when that is used).
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["text_frame"]

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """Return one final, unmasked text frame carrying `payload` (UTF-8 JSON text)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN_TEXT, length)
    elif length < 65536:
        header = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return header + payload


def __getattr__(name: str) -> Any:
    if name == "frames_bytes":
        from ._deprecated import warn_renamed
        from .outbound import frames_of

        warn_renamed("wsbroadcast.frames.frames_bytes", "wsbroadcast.outbound.frames_of")
        return frames_of
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
