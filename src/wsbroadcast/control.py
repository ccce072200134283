"""Close codes and the frames that are not envelopes (errors, recovery notices).

Envelopes carry a room's sequence numbers. The frames built here do not: they go to one
connection only, are never stored in history, and carry no ``seq``, so that a client can tell
them apart and they can never open a gap in the sequence.
"""

from __future__ import annotations

import enum
import json

from pydantic import JsonValue

__all__ = ["RESERVED_TYPES", "CloseCode", "control_frame", "error_frame"]

RESERVED_TYPES = frozenset({"direct", "error", "history_lost", "joined", "left", "presence"})
"""Types ``broadcast`` refuses: the library's unsequenced frames (``error``,
``history_lost``, ``joined``, ``left``, ``presence``) and ``direct``, which only
:meth:`~wsbroadcast.ConnectionManager.send_direct` publishes, so that a room message can never
pass for a direct one."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by wsbroadcast.

    The 4000-4999 range is reserved by RFC 6455 for applications; wsbroadcast uses ``4008`` for
    the slow-consumer disconnect, echoing Centrifugo's 3008 "slow".
    """

    NORMAL = 1000
    """The application closed the connection on purpose."""
    GOING_AWAY = 1001
    """The server is shutting down (the manager's ``async with`` block is exiting)."""
    POLICY_VIOLATION = 1008
    """The client broke a rule of the application (bad id, forbidden origin...)."""
    MESSAGE_TOO_BIG = 1009
    """A frame from the client was larger than the application accepts."""
    INTERNAL_ERROR = 1011
    """The server hit an unexpected condition."""
    SLOW_CONSUMER = 4008
    """The client did not read fast enough: its bounded outbound queue was full."""


def control_frame(type: str, room: str | None, data: JsonValue) -> str:
    """Encode an unsequenced frame ``{"type", "room", "data"}`` for one connection."""
    return json.dumps(
        {"type": type, "room": room, "data": data}, ensure_ascii=False, separators=(",", ":")
    )


def error_frame(code: str, detail: str, room: str | None = None) -> str:
    """Encode ``{"type": "error", "room", "data": {"code", "detail"}}`` for one connection."""
    return control_frame("error", room, {"code": code, "detail": detail})
