"""The chat app's checks at the edge: what a client sends, before it reaches the manager.

The handshake's checks (names, ``since`` and ``epoch``, the ``Origin`` header, the JWT of
`check_token`) and every frame's (size, rate, JSON shape and text length), with what
they answer: a `ClientError` for a frame (an error frame with an `ErrorCode`), a
`Refusal` for a handshake (one of `REFUSALS`, an HTTP error). A WebSocket frame
is parsed by `parse_command` into one `Command` (`Say`, `Join`,
`Leave`, `Direct`). Pure functions and small classes;
`ChatService` applies them.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit

import jwt

from wsbroadcast import is_valid_name
from wsbroadcast.envelope import EPOCH_PATTERN

__all__ = [
    "ERROR_CODES",
    "REFUSALS",
    "ClientError",
    "Command",
    "Direct",
    "ErrorCode",
    "Join",
    "Leave",
    "RateLimiter",
    "Refusal",
    "Say",
    "check_token",
    "origin_allowed",
    "parse_client_frame",
    "parse_command",
    "room_allowed",
    "token_rooms",
    "valid_name",
]

_SINCE = re.compile(r"[0-9]{1,18}")
_SINCE_LIMIT: Final = 10**18
"""``since`` is below this: 1-18 digits, as at the handshake."""
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class ErrorCode:
    """The ``code`` of every error frame the chat app sends (``data.code``)."""

    INVALID_JSON: Final = "invalid_json"
    """The text frame is not valid JSON."""
    NOT_AN_OBJECT: Final = "not_an_object"
    """The JSON value is not an object."""
    MISSING_MESSAGE: Final = "missing_message"
    """The object has no ``message`` field."""
    MESSAGE_NOT_A_STRING: Final = "message_not_a_string"
    """``message`` is not a string."""
    EMPTY_MESSAGE: Final = "empty_message"
    """``message`` is empty or only whitespace."""
    MESSAGE_TOO_LONG: Final = "message_too_long"
    """``message`` has more than ``max_text`` characters."""
    BINARY_FRAME: Final = "binary_frame"
    """The client sent a binary frame; the protocol is text (JSON) only."""
    RATE_LIMITED: Final = "rate_limited"
    """The client sent more frames per second than ``rate_limit`` allows."""
    UNAVAILABLE: Final = "unavailable"
    """The message could not be published: the backend (Redis) cannot be reached or refused
    it. Not the client's fault; nothing was broadcast, and the client may retry."""
    INVALID_MESSAGE: Final = "invalid_message"
    """``message`` cannot be encoded (a lone UTF-16 surrogate such as ``"\\ud800"``, valid
    JSON but not text): nothing was broadcast and no seq was used."""
    INVALID_ROOM: Final = "invalid_room"
    """``join``, ``leave`` or ``room`` is not a room name (a string of 1-64 of
    ``A-Z a-z 0-9 _ . - : # @``)."""
    BAD_SINCE: Final = "bad_since"
    """The ``since`` of a ``join`` is not an integer from 0 to 10**18 - 1 (or null)."""
    BAD_EPOCH: Final = "bad_epoch"
    """The ``epoch`` of a ``join`` is not 1-32 of ``A-Z a-z 0-9 _ -`` (or null)."""
    ALREADY_JOINED: Final = "already_joined"
    """``join`` of a room the connection is in already (its personal stream included)."""
    NOT_JOINED: Final = "not_joined"
    """A message to a room the connection is not in (a room it left, never joined, or a
    personal stream, which takes direct messages only), or ``leave`` of such a room."""
    FORBIDDEN_ROOM: Final = "forbidden_room"
    """``join`` of another client's personal stream (``@`` + its id) or of a room the token's
    ``rooms`` claim does not allow, or ``leave`` of the connection's own personal stream."""
    TOO_MANY_ROOMS: Final = "too_many_rooms"
    """``join`` while the connection is in ``--max-rooms`` rooms already (its personal
    stream not counted)."""
    INVALID_RECIPIENT: Final = "invalid_recipient"
    """The ``to`` of a direct message is not a client id (a string of 1-64 of
    ``A-Z a-z 0-9 _ . - : # @``)."""


ERROR_CODES: Final = tuple(
    sorted(value for name, value in vars(ErrorCode).items() if name.isupper())
)
"""Every error code, for metrics."""
REFUSALS: Final = (
    "bad_epoch",
    "bad_name",
    "bad_since",
    "bad_token",
    "forbidden_origin",
    "forbidden_room",
    "message_too_big",
    "too_many_connections",
    "unavailable",
)
"""Why a handshake was refused or a connection closed for breaking a rule (or, for
``unavailable``, because the backend could not be reached), for metrics."""


@dataclass(frozen=True)
class ClientError:
    """Why a client's frame was refused: becomes ``{"type": "error", "room", "data": {code,
    detail}}``."""

    code: str
    detail: str
    room: str | None = None
    """The room the refused frame was about, when it named a valid one; None: the frame is
    answered in the connection's first room."""


@dataclass(frozen=True)
class Say:
    """``{"message": text}`` or ``{"room": room, "message": text}``: a chat message."""

    room: str | None
    """The room to publish to; None: the connection's first room."""
    text: str


@dataclass(frozen=True)
class Join:
    """``{"join": room, "since": n, "epoch": e}``: join another room, resuming after ``since``
    of stream ``epoch`` when given."""

    room: str
    since: int | None
    epoch: str | None


@dataclass(frozen=True)
class Leave:
    """``{"leave": room}``: stop receiving ``room``."""

    room: str


@dataclass(frozen=True)
class Direct:
    """``{"to": client_id, "message": text}``: a direct message to every tab of ``to``."""

    to: str
    text: str


Command: TypeAlias = Say | Join | Leave | Direct
"""What one client frame asks for, as `parse_command` reads it."""


@dataclass(frozen=True)
class Refusal:
    """Why a WebSocket handshake is refused: an HTTP error on every front end."""

    reason: str
    """One of `REFUSALS`, counted in ``/metrics``."""
    detail: str
    """For the log."""
    status: int = HTTPStatus.FORBIDDEN
    """403, or 429 for a client over the per-IP connection cap."""


def valid_name(value: str) -> bool:
    """Whether ``value`` is a valid client id or room: the library's name grammar
    (`wsbroadcast.names`, 1-64 of ``A-Z a-z 0-9 _ . - : # @``), not a copy of it."""
    return is_valid_name(value)


def _load_object(text: str) -> dict[str, Any] | ClientError:
    """The JSON object ``text`` holds, or why it is not one."""
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and recursion or number-size limits
        return ClientError(ErrorCode.INVALID_JSON, f"the frame is not valid JSON: {exc}")
    except RecursionError:
        return ClientError(ErrorCode.INVALID_JSON, "the frame is nested too deeply")
    if not isinstance(value, dict):
        kind = type(value).__name__ if value is not None else "null"
        return ClientError(
            ErrorCode.NOT_AN_OBJECT, f'send a JSON object {{"message": ...}}, not {kind}'
        )
    return value


def _message(value: dict[str, Any], max_text: int, room: str | None = None) -> str | ClientError:
    """The chat text of ``value["message"]``, or why it is refused (about ``room``)."""
    if "message" not in value:
        return ClientError(ErrorCode.MISSING_MESSAGE, 'the object has no "message" field', room)
    message = value["message"]
    if not isinstance(message, str):
        return ClientError(ErrorCode.MESSAGE_NOT_A_STRING, '"message" must be a string', room)
    if not message.strip():
        return ClientError(ErrorCode.EMPTY_MESSAGE, '"message" must not be empty', room)
    if len(message) > max_text:
        return ClientError(
            ErrorCode.MESSAGE_TOO_LONG,
            f'"message" has {len(message)} characters; the most is {max_text}',
            room,
        )
    return message


def parse_client_frame(text: str, max_text: int) -> str | ClientError:
    """Return the chat text of ``{"message": text}``, or why it is refused.

    Only ``message`` is read: any other field (``client_id``, ``seq``, ``timestamp``...) is
    ignored, because the server sets those itself. The body of ``POST
    /api/rooms/{room}/messages``; a WebSocket frame is read by `parse_command`.
    """
    value = _load_object(text)
    if isinstance(value, ClientError):
        return value
    return _message(value, max_text)


def _room(value: object) -> str | ClientError:
    """``value`` if it is a room name, else an ``invalid_room`` error."""
    if isinstance(value, str) and is_valid_name(value):
        return value
    return ClientError(
        ErrorCode.INVALID_ROOM, "a room is a string of 1-64 of A-Z a-z 0-9 _ . - : # @"
    )


def _join(value: dict[str, Any]) -> Join | ClientError:
    room = _room(value["join"])
    if isinstance(room, ClientError):
        return room
    since = value.get("since")
    if since is not None and (
        isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < _SINCE_LIMIT
    ):
        detail = '"since" must be an integer >= 0 (the last seq seen), or null'
        return ClientError(ErrorCode.BAD_SINCE, detail, room)
    epoch = value.get("epoch")
    if epoch is not None and (not isinstance(epoch, str) or not EPOCH_PATTERN.fullmatch(epoch)):
        detail = '"epoch" must be 1-32 of A-Z a-z 0-9 _ - (the last envelope\'s), or null'
        return ClientError(ErrorCode.BAD_EPOCH, detail, room)
    return Join(room, since, epoch)


def parse_command(text: str, max_text: int) -> Command | ClientError:
    """Read one client frame (a JSON object) as a `Command`, or say why it is refused.

    The first of these keys that the object has decides what it is, whatever else it holds:

    - ``join``: `Join` (``since`` and ``epoch`` optional, null meaning absent);
    - ``leave``: `Leave`;
    - ``to``: `Direct`, with ``message``;
    - otherwise `Say` with ``message``, to ``room`` if the object has one.

    Other fields (``client_id``, ``seq``, ``timestamp``...) are ignored: the server sets
    those itself. Never raises, whatever ``text`` holds.
    """
    value = _load_object(text)
    if isinstance(value, ClientError):
        return value
    if "join" in value:
        return _join(value)
    if "leave" in value:
        left = _room(value["leave"])
        return left if isinstance(left, ClientError) else Leave(left)
    if "to" in value:
        to = value["to"]
        if not (isinstance(to, str) and is_valid_name(to)):
            detail = '"to" must be a client id: 1-64 of A-Z a-z 0-9 _ . - : # @'
            return ClientError(ErrorCode.INVALID_RECIPIENT, detail)
        message = _message(value, max_text)
        return message if isinstance(message, ClientError) else Direct(to, message)
    room: str | None = None
    if "room" in value:
        checked = _room(value["room"])
        if isinstance(checked, ClientError):
            return checked
        room = checked
    message = _message(value, max_text, room)
    return message if isinstance(message, ClientError) else Say(room, message)


def _size(frame: str | bytes) -> int:
    """A frame's size on the wire, in bytes."""
    return len(frame.encode()) if isinstance(frame, str) else len(frame)


class RateLimiter:
    """A token bucket: ``rate`` frames per second on average, bursts of ``2 * rate``.

    :param clock: a monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = 2 * rate
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def allow(self) -> bool:
        """Take one token if there is one; false means the frame must be refused."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class _LocalBuckets:
    """Rate-limit buckets kept in this process, by key: what `ChatService` falls back
    on while the backend cannot answer ``allow`` (fail open, but still limited per node).

    At most ``max_buckets``; past that the least recently used is forgotten.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[tuple[str, float], RateLimiter] = OrderedDict()

    def allow(self, key: str, rate: float) -> bool:
        """Take a token from ``key``'s bucket (``rate`` per second, bursts of twice that)."""
        buckets = self._buckets
        limiter = buckets.pop((key, rate), None) or RateLimiter(rate)
        buckets[key, rate] = limiter
        while len(buckets) > self.max_buckets:
            buckets.popitem(last=False)
        return limiter.allow()


def _claims(token: str | None, secret: str, client_id: str) -> dict[str, Any] | str:
    """The claims of a valid token for ``client_id``, or why it is not one."""
    if not token:
        return "a token is required (?token=...)"
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["sub", "exp"]}
        )
    except jwt.PyJWTError as exc:
        return f"bad token: {exc}"
    if claims["sub"] != client_id:
        return "the token is for another client id"
    rooms = claims.get("rooms")
    if rooms is not None and (
        not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)
    ):
        return "the token's rooms claim is not a list of names"
    return claims


def check_token(token: str | None, secret: str, client_id: str, room: str) -> str | None:
    """Why ``token`` does not let ``client_id`` into ``room``, or None if it does.

    The token is an HS256 JWT (no other algorithm is accepted, so neither ``none`` nor a
    public key passed off as a secret) with ``sub`` (the client id it speaks for) and
    ``exp`` (required: a token without expiry would be a password forever); an optional
    ``rooms`` claim lists the rooms it may join, ``*`` matching any run of characters.
    """
    claims = _claims(token, secret, client_id)
    if isinstance(claims, str):
        return claims
    if not room_allowed(claims.get("rooms"), room):
        return f"the token does not allow room {room!r}"
    return None


def token_rooms(token: str, secret: str, client_id: str) -> tuple[str, ...] | None:
    """The ``rooms`` claim of a token `check_token` accepted (None: any room), for the
    rooms the connection joins later."""
    claims = _claims(token, secret, client_id)
    if isinstance(claims, str):
        raise ValueError(claims)
    rooms = claims.get("rooms")
    return None if rooms is None else tuple(rooms)


def room_allowed(patterns: list[str] | tuple[str, ...] | None, room: str) -> bool:
    """Whether a ``rooms`` claim (``*`` wildcards; None: no claim, any room) allows ``room``."""
    if patterns is None:
        return True
    return any(_wildcard(pattern).fullmatch(room) for pattern in patterns)


def _wildcard(pattern: str) -> re.Pattern[str]:
    """``pattern`` with ``*`` matching any run of characters and nothing else special."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _normalize_origin(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port made explicit, or None if malformed."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username is not None:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    host = parts.hostname
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def origin_allowed(
    origin: str | None, host: str | None, secure: bool, allowed: tuple[str, ...] = ()
) -> bool:
    """Whether a WebSocket handshake with this ``Origin`` header may proceed.

    No ``Origin`` (a non-browser client) is allowed. Otherwise the origin must be the server's
    own (``http[s]://`` + the ``Host`` header) or one of ``allowed``.
    """
    if origin is None:
        return True
    normalized = _normalize_origin(origin)
    if normalized is None:
        return False
    if host:
        own = _normalize_origin(f"{'https' if secure else 'http'}://{host}")
        if own is not None and normalized == own:
            return True
    return any(normalized == _normalize_origin(other) for other in allowed)
