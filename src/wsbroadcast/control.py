"""Close codes and control messages: the JSON messages that are not envelopes.

Envelopes carry a room's sequence numbers. A `ControlMessage` does not: it goes to one
connection only (an error, a `history_lost` notice, the `joined` and `left`
acknowledgements), is never stored in history, and carries no `seq`, so that a client can
tell it apart and it can never open a gap in the sequence. Its wire form is
`{"type", "room", "data"}`; like an `Envelope` it encodes its `text` once and builds its
WebSocket `frame` once.
"""

from __future__ import annotations

import enum
import json
import warnings

from pydantic import JsonValue

from .frames import text_frame

__all__ = ["RESERVED_TYPES", "CloseCode", "ControlMessage", "control_frame", "error_frame"]

RESERVED_TYPES = frozenset({"direct", "error", "history_lost", "joined", "left", "presence"})
"""Types `broadcast` refuses: the library's control messages (`error`, `history_lost`,
`joined`, `left`, `presence`) and `direct`, which only
`ConnectionManager.send_direct` publishes, so that a room message can never pass for a
direct one."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by wsbroadcast.

    The 4000-4999 range is reserved by RFC 6455 for applications; wsbroadcast uses `4008` for
    the slow-consumer disconnect, echoing Centrifugo's 3008 "slow".
    """

    NORMAL = 1000
    """The application closed the connection on purpose."""
    GOING_AWAY = 1001
    """The server is shutting down (the manager's `async with` block is exiting)."""
    POLICY_VIOLATION = 1008
    """The client broke a rule of the application (bad id, forbidden origin...)."""
    MESSAGE_TOO_BIG = 1009
    """A frame from the client was larger than the application accepts."""
    INTERNAL_ERROR = 1011
    """The server hit an unexpected condition."""
    SLOW_CONSUMER = 4008
    """The client did not read fast enough: its bounded outbound queue was full."""


class ControlMessage:
    """An unsequenced message `{"type", "room", "data"}` for one connection.

    Its `text` (the JSON sent on the wire) and `size` (bytes of `text` in UTF-8) are made
    once, when it is built; `frame` (its WebSocket text frame, for transports that write raw
    frames) on first use. Build the library's own with `error`, `history_lost`, `joined` and
    `left`; an application sends its own with `Connection.send_control`.
    """

    __slots__ = ("_frame", "data", "room", "size", "text", "type")

    def __init__(self, type: str, room: str | None, data: JsonValue = None) -> None:
        self.type = type
        self.room = room
        self.data = data
        self.text = json.dumps(
            {"type": type, "room": room, "data": data}, ensure_ascii=False, separators=(",", ":")
        )
        """The JSON text sent on the wire."""
        self.size = len(self.text.encode())
        """Bytes of `text` in UTF-8: what it costs in a queue."""
        self._frame: bytes | None = None

    @classmethod
    def from_text(cls, text: str) -> ControlMessage:
        """The control message whose wire form is `text`, kept as it is (never re-encoded).

        `type`, `room` and `data` are read from it when it is a JSON object (else they are
        `""`, None and None: a text the library does not read).
        """
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {}
        message = cls.__new__(cls)
        message.type = str(parsed.get("type", ""))
        message.room = parsed.get("room") if isinstance(parsed.get("room"), str) else None
        message.data = parsed.get("data")
        message.text = text
        message.size = len(text.encode())
        message._frame = None
        return message

    @property
    def frame(self) -> bytes:
        """The whole WebSocket text frame for `text`, built on first use."""
        frame = self._frame
        if frame is None:
            frame = self._frame = text_frame(self.text.encode())
        return frame

    def __repr__(self) -> str:
        return f"ControlMessage({self.text})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ControlMessage):
            return NotImplemented
        return self.text == other.text

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def error(cls, code: str, detail: str, room: str | None = None) -> ControlMessage:
        """`{"type": "error", "room", "data": {"code", "detail"}}`."""
        return cls("error", room, {"code": code, "detail": detail})

    @classmethod
    def history_lost(
        cls, room: str, *, since: int, epoch: str, first_seq: int, last_seq: int
    ) -> ControlMessage:
        """`{"type": "history_lost", "room", "data": {"since", "epoch", "first_seq",
        "last_seq"}}`: the client's `since` cannot be resumed; the stream `epoch` goes on
        after `last_seq`."""
        data: dict[str, JsonValue] = {
            "since": since,
            "epoch": epoch,
            "first_seq": first_seq,
            "last_seq": last_seq,
        }
        return cls("history_lost", room, data)

    @classmethod
    def joined(cls, room: str, *, seq: int, epoch: str) -> ControlMessage:
        """`{"type": "joined", "room", "data": {"seq", "epoch"}}`: the client is up to date
        with `room`'s stream `epoch` up to `seq`."""
        return cls("joined", room, {"seq": seq, "epoch": epoch})

    @classmethod
    def left(cls, room: str) -> ControlMessage:
        """`{"type": "left", "room", "data": null}`: nothing of `room` follows."""
        return cls("left", room, None)


def control_frame(type: str, room: str | None, data: JsonValue) -> str:
    """Deprecated: use `ControlMessage(type, room, data).text`."""
    warnings.warn(
        "control_frame() is deprecated: use ControlMessage(type, room, data).text",
        DeprecationWarning,
        stacklevel=2,
    )
    return ControlMessage(type, room, data).text


def error_frame(code: str, detail: str, room: str | None = None) -> str:
    """Deprecated: use `ControlMessage.error(code, detail, room).text`."""
    warnings.warn(
        "error_frame() is deprecated: use ControlMessage.error(code, detail, room).text",
        DeprecationWarning,
        stacklevel=2,
    )
    return ControlMessage.error(code, detail, room).text
