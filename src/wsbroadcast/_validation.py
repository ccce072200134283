"""Checks shared by the manager and the backends, so that both refuse the same input."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ConfigDict, JsonValue, TypeAdapter, ValidationError

from .control import RESERVED_TYPES
from .exceptions import InvalidData, InvalidInput
from .names import NAME_MAX_LENGTH, check_name, is_user_room

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "MAX_DEPTH",
    "NAME_MAX_LENGTH",
    "check_data",
    "check_name",
    "check_publication",
]

_DATA = TypeAdapter(JsonValue, config=ConfigDict(allow_inf_nan=False))

MAX_DEPTH = 64
"""Most levels of nested arrays and objects in a payload (every JSON parser has a limit)."""
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
"""Integers must fit in 64 bits, signed or unsigned, so that every client parses them back."""


def check_publication(room: str, client_id: str | None, type: str) -> None:
    """Check what a publish names: a room that is not a personal stream, a client id or None
    (the server), a type that is not reserved."""
    check_name("room", room)
    if is_user_room(room):
        raise InvalidInput(f"room {room!r} is a personal stream: use send_direct")
    if client_id is not None:
        check_name("client_id", client_id)
    check_name("type", type)
    if type in RESERVED_TYPES:
        raise InvalidInput(f"type {type!r} is reserved (see RESERVED_TYPES)")


def check_data(value: object) -> JsonValue:
    """Return ``value`` if it is a JSON value every client can read back, else raise.

    Finite numbers, integers within 64 bits, string keys, at most `MAX_DEPTH` levels of
    nesting. Strings that are not valid Unicode (a lone surrogate) are refused when the
    envelope is encoded, before any seq is taken (see `Draft`).
    """
    if isinstance(value, (list, dict)):
        _check_tree(value)
    elif isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        raise InvalidData("data is an integer outside 64 bits")
    try:
        return _DATA.validate_python(value, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "data"
        raise InvalidData(f"data is not a JSON value at {where}: {first['msg']}") from None


def _check_tree(root: list[object] | dict[object, object]) -> None:
    """Depth and integer range of a container, without recursion (no RecursionError)."""
    stack: list[tuple[Iterable[object], int]] = [(_children(root), 1)]
    while stack:
        items, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidData(f"data is nested more than {MAX_DEPTH} levels deep")
        for item in items:
            if isinstance(item, (list, dict, tuple)):
                stack.append((_children(item), depth + 1))
            elif isinstance(item, int) and not INT_MIN <= item <= INT_MAX:
                raise InvalidData("data holds an integer outside 64 bits")


def _children(value: list[object] | tuple[object, ...] | dict[object, object]) -> Iterable[object]:
    return value.values() if isinstance(value, dict) else value
