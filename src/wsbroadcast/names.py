"""The name grammar: what a room, a client id and an envelope type may be.

A name is 1 to `NAME_MAX_LENGTH` (64) characters, each one of::

    A-Z  a-z  0-9  _  .  -  :  #  @

so namespaced names such as ``chat:lobby``, ``user#42``, ``orders.eu-1`` and
``alice@example.com`` are valid. Only ASCII: ``é`` and every other non-ASCII character is
refused (a name then has one spelling, one length in bytes and characters, and no Unicode
normalisation or look-alike question). Nothing else is allowed, and on purpose:

- no whitespace and no control characters: a name is printed in logs and metrics and must
  read back as one token; the Redis backend's presence index stores ``"<room> <client>"``
  entries split on the space;
- no ``/ ? & = + %``: they change meaning in URL paths and query strings, where rooms and
  client ids travel (``+`` decodes to a space in a query, ``%`` starts an escape), and ``%``
  is what the Redis backend escapes ``:`` with in its keys, so it must not be a name
  character itself;
- no ``{ }``: Redis Cluster hash tags put braces around part of a key;
- no quotes or backslash: names are spliced into JSON as they are.

``#`` and ``:`` are safe in names but not everywhere as typed: a URL must percent-encode
``#`` (``user%2342``: unescaped it starts the fragment) and should encode ``:`` and ``@``
(``encodeURIComponent`` does all three). In the Redis backend's keys ``:`` separates parts,
so room names and client ids are written there with ``:`` escaped as ``%3A`` (names without
``:`` give the same keys as before).

Personal streams: the room ``@<client id>`` (`user_room`) is the stream of direct
messages to that client. Only that client may connect to or join it, nothing is announced
in it and
``broadcast`` refuses it (`send_direct` publishes there),
so application rooms should not start with ``@`` (`USER_ROOM_PREFIX`).
"""

from __future__ import annotations

import re
from typing import Final

from .exceptions import InvalidName

__all__ = [
    "NAME_CHARACTERS",
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "USER_ROOM_PREFIX",
    "check_name",
    "is_user_room",
    "is_valid_name",
    "user_room",
]

NAME_MAX_LENGTH: Final = 64
"""Most characters in a name."""
NAME_CHARACTERS: Final = "A-Z a-z 0-9 _ . - : # @"
"""The characters a name may hold, as written in error messages and docs."""
NAME_PATTERN: Final = re.compile(rf"[A-Za-z0-9_.\-:#@]{{1,{NAME_MAX_LENGTH}}}")
"""A valid name, to be used with ``fullmatch`` (``match`` would accept a valid prefix)."""
_CHARACTER: Final = re.compile(r"[A-Za-z0-9_.\-:#@]")
USER_ROOM_PREFIX: Final = "@"
"""Rooms whose name starts with this are personal streams (see `user_room`)."""


def is_valid_name(value: object) -> bool:
    """Whether ``value`` is a valid room, client id or envelope type."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


def check_name(field: str, value: object) -> str:
    """Return ``value`` if it is a valid room, client id or type name, else raise InvalidName.

    ``field`` names the argument in the error; the reason says exactly what is wrong.
    """
    if not isinstance(value, str):
        raise InvalidName(field, value, "must be a string")
    if not value:
        raise InvalidName(field, value, "must not be empty")
    if len(value) > NAME_MAX_LENGTH:
        raise InvalidName(field, value, f"must be at most {NAME_MAX_LENGTH} characters")
    if NAME_PATTERN.fullmatch(value) is None:
        bad = next(char for char in value if _CHARACTER.fullmatch(char) is None)
        raise InvalidName(
            field, value, f"must not contain {bad!r}: only {NAME_CHARACTERS} are allowed"
        )
    return value


def user_room(client_id: str) -> str:
    """The personal stream of ``client_id``: where its direct messages are published.

    ``"@" + client_id`` (so it may be one character longer than a name). Raises
    `InvalidName` for a bad client id.
    """
    return USER_ROOM_PREFIX + check_name("client_id", client_id)


def is_user_room(room: str) -> bool:
    """Whether ``room`` names a personal stream (it starts with ``@``)."""
    return room.startswith(USER_ROOM_PREFIX)
