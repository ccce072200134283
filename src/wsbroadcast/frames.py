"""WebSocket frames built once and written to many sockets (RFC 6455, section 5.2).

Frames a server sends are not masked, so a text frame's bytes are the same for every
recipient whose connection negotiated no extension (such as permessage-deflate). A transport
that can write raw frames (see :class:`~wsbroadcast.transport.BatchTransport`) then writes
the one prepared frame of an envelope to every socket, and a connection's pending frames in
one write. This module is sans-I/O: it only builds bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .envelope import Envelope

__all__ = ["frames_bytes", "text_frame"]

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """Return one final, unmasked text frame carrying ``payload`` (UTF-8 JSON text)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN_TEXT, length)
    elif length < 65536:
        header = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return header + payload


def frames_bytes(items: Sequence[Envelope | str]) -> bytes:
    """Return the frames of ``items`` back to back, for one socket write.

    An envelope contributes its prepared :attr:`~wsbroadcast.Envelope.frame`, shared by every
    recipient; a ``str`` (a one-off frame such as an error) is framed here.
    """
    if len(items) == 1:  # the common case: one publish since the last write
        item = items[0]
        return text_frame(item.encode()) if isinstance(item, str) else item.frame
    return b"".join(
        [text_frame(item.encode()) if isinstance(item, str) else item.frame for item in items]
    )
