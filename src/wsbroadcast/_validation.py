"""Checks shared by the manager and the backends, so that both refuse the same input."""

from __future__ import annotations

import re

from pydantic import ConfigDict, JsonValue, TypeAdapter, ValidationError

from .exceptions import InvalidData, InvalidName

NAME_MAX_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DATA = TypeAdapter(JsonValue, config=ConfigDict(allow_inf_nan=False))


def check_name(field: str, value: object) -> str:
    """Return ``value`` if it is a valid room, client id or type name, else raise InvalidName."""
    if not isinstance(value, str):
        raise InvalidName(field, value, "must be a string")
    if not value:
        raise InvalidName(field, value, "must not be empty")
    if len(value) > NAME_MAX_LENGTH:
        raise InvalidName(field, value, f"must be at most {NAME_MAX_LENGTH} characters")
    if _NAME.fullmatch(value) is None:
        raise InvalidName(field, value, "may only contain A-Z a-z 0-9 _ . -")
    return value


def check_data(value: object) -> JsonValue:
    """Return ``value`` if it is a JSON value (finite numbers, string keys), else raise."""
    try:
        return _DATA.validate_python(value, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "data"
        raise InvalidData(f"data is not a JSON value at {where}: {first['msg']}") from None
