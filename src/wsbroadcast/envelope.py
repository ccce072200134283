"""The message envelope: what every subscriber of a room receives, in the same order."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime, timezone
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, field_serializer
from pydantic_core import PydanticSerializationError

from ._validation import check_data
from .exceptions import InvalidData
from .frames import text_frame
from .names import check_name, user_room

__all__ = ["EPOCH_PATTERN", "Draft", "Envelope", "direct_drafts", "new_epoch"]

EPOCH_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,32}")
"""What an epoch looks like: 1-32 of ``A-Z a-z 0-9 _ -`` (it is spliced into JSON as is)."""


def new_epoch() -> str:
    """A fresh, random epoch for a stream that starts now (8 hex digits)."""
    return uuid.uuid4().hex[:8]


class Envelope(BaseModel):
    """One published message of a room, as stored in history and sent to every subscriber.

    Envelopes are made by a `Backend`'s ``publish``, which is the
    single source of order: it assigns ``seq`` (1, 2, 3, ... per room, gap-free) within the
    room's stream, whose ``epoch`` names it. A stream starts a new epoch when its history is
    lost (a restart of an in-memory backend, a Redis that came back empty, a room forgotten
    after its history TTL): a client that resumes with the ``(epoch, seq)`` of its last
    envelope either gets exactly what it missed or is told ``history_lost``, never a stream
    it cannot tell apart from the old one.

    Envelopes are immutable, and `text` is encoded exactly once, before the backend
    numbers it (see `Draft`), however many connections receive it; `frame`
    builds its WebSocket frame once.

    The wire form (``text``) is a JSON object with the fields in this order:
    ``type, room, seq, epoch, id, client_id, timestamp, data``. See ``docs/protocol.md``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    type: str = Field(description='"message", "join", "leave" or an application-defined type.')
    room: str = Field(description="The room (topic) the envelope was published to.")
    seq: int = Field(ge=1, description="Position in the room's stream: 1, 2, 3, ... gap-free.")
    epoch: str = Field(
        default="", description="The room stream's epoch: changes when its history is lost."
    )
    id: str = Field(description="Unique id of this envelope.")
    client_id: str | None = Field(
        description="Who published it, as set by the server; null when the server itself did"
        " (no client id can be null, so it cannot be forged)."
    )
    timestamp: datetime = Field(description="When the envelope was made (UTC).")
    data: JsonValue = Field(default=None, description="The application payload.")

    @field_serializer("timestamp")
    def _timestamp_iso(self, value: datetime) -> str:
        return value.isoformat()

    @cached_property
    def text(self) -> str:
        """The JSON text sent on the wire, encoded on first use and then shared by everyone."""
        return self.model_dump_json()

    @cached_property
    def size(self) -> int:
        """Bytes of `text` in UTF-8: what it costs in a queue and in history."""
        return len(self.text.encode())

    @cached_property
    def frame(self) -> bytes:
        """The whole WebSocket text frame for `text`, built once, for raw transports."""
        return text_frame(self.text.encode())

    @classmethod
    def from_text(cls, text: str) -> Envelope:
        """Parse an envelope from its wire form, keeping ``text`` so it is never re-encoded."""
        envelope = cls.model_validate_json(text)
        envelope.__dict__["text"] = text
        return envelope


_ID_BLOCK = 256
"""Envelope ids taken from the OS's random generator at a time."""
_ids: list[str] = []


def _new_id() -> str:
    """A random 128-bit envelope id, in hex.

    From the OS's CSPRNG like ``os.urandom(16)``, but fetched 256 ids at a time: one system
    call per id was a measurable share of a publish. ``list.pop`` is atomic, so threads never
    share an id, and a forked child starts with an empty list instead of its parent's ids.
    """
    try:
        return _ids.pop()
    except IndexError:
        block = os.urandom(16 * _ID_BLOCK).hex()
        _ids[:] = [block[i : i + 32] for i in range(32, len(block), 32)]
        return block[:32]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.clear)

_FIELDS = frozenset(Envelope.model_fields)
_PLAIN = re.compile(r"[A-Za-z0-9_.\-:#@]*")
_DATA_JSON = TypeAdapter(JsonValue).serializer


def _json_string(value: str) -> str:
    """``value`` as a JSON string (names are plain, so usually no escaping is needed)."""
    if _PLAIN.fullmatch(value) is not None:
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def _client_json(client_id: str | None) -> str:
    return "null" if client_id is None else _json_string(client_id)


class Draft:
    """An envelope before a backend numbers it: checked and encoded, but for seq and epoch.

    Backends take drafts, not raw data, so that whatever cannot be encoded (a lone surrogate,
    nesting too deep, an integer no client can read) is refused with
    `InvalidData` *before* a seq is taken: a publish either
    raises with no seq consumed or yields an envelope every subscriber can receive. Splicing
    the seq and epoch into the encoded text (`envelope`) cannot fail.
    """

    __slots__ = (
        "_base_size",
        "client_id",
        "data",
        "head",
        "id",
        "room",
        "size",
        "tail",
        "timestamp",
        "type",
    )

    def __init__(self, type: str, room: str, client_id: str | None, data: JsonValue = None) -> None:
        self.type = type
        self.room = room
        self.client_id = client_id
        self.data = check_data(data)
        self.id = _new_id()
        self.timestamp = datetime.now(timezone.utc)
        try:
            encoded = _DATA_JSON.to_json(self.data)
        except (PydanticSerializationError, ValueError) as exc:
            raise InvalidData(f"data cannot be encoded as UTF-8 JSON: {exc}") from None
        # The same text as Envelope.model_dump_json(), fields in the same order.
        self.head = f'{{"type":{_json_string(type)},"room":{_json_string(room)},"seq":'
        self.tail = (
            f'","id":"{self.id}","client_id":{_client_json(client_id)},'
            f'"timestamp":"{self.timestamp.isoformat()}","data":{encoded.decode()}}}'
        )
        self._base_size = len(self.head.encode()) + len(self.tail.encode()) + len(',"epoch":"')
        self.size = self._base_size + 20 + 8
        """The envelope's size in bytes for a seq of up to 20 digits and an 8-character epoch
        (what `new_epoch` makes): known before the backend numbers it."""

    def to_room(self, room: str) -> Draft:
        """The same envelope (same ``id``, timestamp and data) for another room: the copy of a
        direct message published in the sender's personal stream."""
        copy = Draft.__new__(Draft)
        for name in Draft.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.room = room
        copy.head = f'{{"type":{_json_string(self.type)},"room":{_json_string(room)},"seq":'
        grown = len(copy.head.encode()) - len(self.head.encode())
        copy._base_size = self._base_size + grown
        copy.size = self.size + grown
        return copy

    def envelope(self, seq: int, epoch: str) -> Envelope:
        """The envelope numbered ``seq`` in the stream ``epoch``, its text spliced, not encoded."""
        return _assembled(
            {
                "type": self.type,
                "room": self.room,
                "seq": seq,
                "epoch": epoch,
                "id": self.id,
                "client_id": self.client_id,
                "timestamp": self.timestamp,
                "data": self.data,
                "text": f'{self.head}{seq},"epoch":"{epoch}{self.tail}',
                "size": self._base_size + len(str(seq)) + len(epoch),
            }
        )

    def text(self, seq: int, epoch: str) -> str:
        """The wire form of `envelope` (for backends that store text)."""
        return f'{self.head}{seq},"epoch":"{epoch}{self.tail}'


_new_envelope = Envelope.__new__
_set = object.__setattr__


def _assembled(values: dict[str, object]) -> Envelope:
    """An envelope from checked values (its fields, ``text`` and ``size``), as
    ``Envelope.model_construct()`` makes one but without its per-field work."""
    envelope = _new_envelope(Envelope)
    _set(envelope, "__dict__", values)
    _set(envelope, "__pydantic_fields_set__", _FIELDS)
    _set(envelope, "__pydantic_extra__", None)
    _set(envelope, "__pydantic_private__", None)
    return envelope


Stored = tuple[int, int, str, str, str, str, str, "str | None", datetime]
"""An envelope as a history keeps it: ``(seq, size, text, type, room, epoch, id, client_id,
timestamp)``, atomic values only, which the garbage collector stops tracking. An
`Envelope` and its ``__dict__`` are two objects that every full collection traverses, and
a room's history holds up to a thousand: with many rooms, most of the heap (see
docs/performance.md). ``data`` is read back from the text."""


def stored(envelope: Envelope) -> Stored:
    """What a history keeps of ``envelope`` (`restored` gives it back)."""
    return (
        envelope.seq,
        envelope.size,
        envelope.text,
        envelope.type,
        envelope.room,
        envelope.epoch,
        envelope.id,
        envelope.client_id,
        envelope.timestamp,
    )


def restored(record: Stored) -> Envelope:
    """The envelope `stored` kept: equal to it, the same ``text``; ``data`` parsed from it."""
    seq, size, text, type, room, epoch, id, client_id, timestamp = record
    return _assembled(
        {
            "type": type,
            "room": room,
            "seq": seq,
            "epoch": epoch,
            "id": id,
            "client_id": client_id,
            "timestamp": timestamp,
            "data": json.loads(text)["data"],
            "text": text,
            "size": size,
        }
    )


def direct_drafts(to: str, data: JsonValue, client_id: str | None) -> tuple[Draft, ...]:
    """The drafts of a direct message: type ``direct``, data ``{"to": to, "data": data}``, in
    the personal stream of ``to`` and, for a client sender other than ``to``, of the sender.

    Both carry the same ``id``. Raises `InvalidInput` for a
    bad ``to`` or ``client_id`` and `InvalidData` for data that
    cannot be encoded, before anything is published.
    """
    recipient = user_room(to)
    if client_id is not None:
        check_name("client_id", client_id)
    draft = Draft("direct", recipient, client_id, {"to": to, "data": data})
    if client_id is None or client_id == to:
        return (draft,)
    return draft, draft.to_room(user_room(client_id))
