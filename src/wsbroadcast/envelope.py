"""The message envelope: what every subscriber of a room receives, in the same order."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_serializer

from .frames import text_frame

__all__ = ["Envelope"]


class Envelope(BaseModel):
    """One published message of a room, as stored in history and sent to every subscriber.

    Envelopes are made by a :class:`~wsbroadcast.backend.Backend`'s ``publish``, which is the
    single source of order: it assigns ``seq`` (1, 2, 3, ... per room, gap-free) and the server
    ``timestamp``. Envelopes are immutable, and :attr:`text` encodes one to JSON exactly once,
    however many connections receive it (as :attr:`frame` builds its WebSocket frame once).

    The wire form (``text``) is a JSON object with the fields in this order:
    ``type, room, seq, id, client_id, timestamp, data``. See ``docs/protocol.md``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    type: str = Field(description='"message", "join", "leave" or an application-defined type.')
    room: str = Field(description="The room (topic) the envelope was published to.")
    seq: int = Field(ge=1, description="Position in the room's stream: 1, 2, 3, ... gap-free.")
    id: str = Field(description="Unique id of this envelope.")
    client_id: str = Field(description="Who published it, as set by the server.")
    timestamp: datetime = Field(description="When the backend accepted it (UTC).")
    data: JsonValue = Field(default=None, description="The application payload.")

    @field_serializer("timestamp")
    def _timestamp_iso(self, value: datetime) -> str:
        return value.isoformat()

    @cached_property
    def text(self) -> str:
        """The JSON text sent on the wire, encoded on first use and then shared by everyone."""
        return self.model_dump_json()

    @cached_property
    def frame(self) -> bytes:
        """The whole WebSocket text frame for :attr:`text`, built once, for raw transports."""
        return text_frame(self.text.encode())

    @classmethod
    def from_text(cls, text: str) -> Envelope:
        """Parse an envelope from its wire form, keeping ``text`` so it is never re-encoded."""
        envelope = cls.model_validate_json(text)
        envelope.__dict__["text"] = text
        return envelope
