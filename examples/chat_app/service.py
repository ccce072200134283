"""The chat app's protocol, whatever server runs it: :class:`ChatService` and its checks.

Routes (documented in ``docs/protocol.md``, "The chat app's WebSocket protocol")::

    GET  /              chat.html
    GET  /healthz       {"status": "ok", ...}
    GET  /metrics       Prometheus text format
    GET  /rooms/{room}  {"room", "online", "seq"}
    WS   /ws/{client_id}?room=NAME&since=SEQ

Everything a client sends is checked at the edge before it reaches the manager: names and
``since`` at the handshake (refused with HTTP 403), the ``Origin`` header against cross-site
WebSocket hijacking, and every frame for size, rate, JSON shape and text length. A client's
mistake gets an unsequenced error frame on its own connection, never a traceback in the log.

Nothing here imports a web server. A front end (:mod:`examples.chat_app.app` on Starlette,
:mod:`examples.chat_app.websockets_server` on the ``websockets`` library) matches the routes,
turns :class:`HttpResponse` into its own response type and hands each WebSocket to
:meth:`ChatService.serve` as a :class:`ChatSocket`; so the protocol is written once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from pydantic import JsonValue

from wsbroadcast import (
    DEFAULT_QUEUE_SIZE,
    BackendError,
    CloseCode,
    Connection,
    ConnectionManager,
    ConnectionState,
    InvalidInput,
    ManagerNotRunning,
    Transport,
    WSBroadcastError,
    control_frame,
)

__all__ = [
    "ChatRequest",
    "ChatService",
    "ChatSocket",
    "ClientError",
    "ErrorCode",
    "FrameTooBig",
    "Handshake",
    "HttpResponse",
    "RateLimiter",
    "Refusal",
    "Settings",
    "origin_allowed",
    "parse_client_frame",
    "valid_name",
]

logger = logging.getLogger("examples.chat_app")

CHAT_HTML: Final = Path(__file__).with_name("static") / "chat.html"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SINCE = re.compile(r"[0-9]{1,18}")
CLOSE_WAIT: Final = 1.0
"""Seconds to wait for a close frame to be written before giving up on the socket."""
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


ERROR_CODES: Final = tuple(
    sorted(value for name, value in vars(ErrorCode).items() if name.isupper())
)
"""Every error code, for metrics."""
REFUSALS: Final = (
    "bad_name",
    "bad_since",
    "forbidden_origin",
    "message_too_big",
    "unavailable",
)
"""Why a handshake was refused or a connection closed for breaking a rule (or, for
``unavailable``, because the backend could not be reached), for metrics."""


@dataclass(frozen=True)
class ClientError:
    """Why a client's frame was refused: becomes ``{"type": "error", "data": {code, detail}}``."""

    code: str
    detail: str


@dataclass(frozen=True)
class Settings:
    """Everything the command line can set; :func:`create_app` builds an app from it."""

    backend: str = "memory://"
    """Backend URL for :func:`wsbroadcast.backend_from_url`."""
    rate_limit: float = 20
    """Frames per second per connection (burst ``2 * rate_limit``); 0 turns it off."""
    max_message_bytes: int = 65536
    """Largest frame accepted (UTF-8 bytes); a larger one closes the connection with 1009."""
    max_text: int = 4000
    """Most characters in a chat message."""
    queue_size: int = DEFAULT_QUEUE_SIZE
    """Frames each connection may have waiting before it is closed as a slow consumer."""
    history: int | None = None
    """Envelopes kept per room for resume (``history=N`` in the backend URL); None: default."""
    allowed_origins: tuple[str, ...] = ()
    """Origins besides the server's own that may open a WebSocket (``scheme://host[:port]``)."""
    slow_consumer: str = "disconnect"
    """The manager's slow-consumer policy."""

    def __post_init__(self) -> None:
        if not (self.rate_limit >= 0 and math.isfinite(self.rate_limit)):
            raise ValueError(f"rate_limit must be a finite number >= 0, not {self.rate_limit}")
        for name in ("max_message_bytes", "max_text", "queue_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.history is not None and self.history < 0:
            raise ValueError(f"history must be >= 0, not {self.history}")
        for origin in self.allowed_origins:
            if _normalize_origin(origin) is None:
                raise ValueError(f"allowed_origins: {origin!r} is not scheme://host[:port]")

    def backend_url(self) -> str:
        """The backend URL, with ``history=N`` added when :attr:`history` is set."""
        if self.history is None:
            return self.backend
        base, _, query = self.backend.partition("?")
        options = [(k, v) for k, v in parse_qsl(query) if k != "history"]
        options.append(("history", str(self.history)))
        return f"{base}?{urlencode(options)}"


def valid_name(value: str) -> bool:
    """Whether ``value`` is a valid client id or room: 1-64 of ``A-Z a-z 0-9 _ . -``."""
    return _NAME.fullmatch(value) is not None


def parse_client_frame(text: str, max_text: int) -> str | ClientError:
    """Return the chat text of one client frame ``{"message": text}``, or why it is refused.

    Only ``message`` is read: any other field (``client_id``, ``seq``, ``timestamp``...) is
    ignored, because the server sets those itself.
    """
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
    if "message" not in value:
        return ClientError(ErrorCode.MISSING_MESSAGE, 'the object has no "message" field')
    message = value["message"]
    if not isinstance(message, str):
        return ClientError(ErrorCode.MESSAGE_NOT_A_STRING, '"message" must be a string')
    if not message.strip():
        return ClientError(ErrorCode.EMPTY_MESSAGE, '"message" must not be empty')
    if len(message) > max_text:
        return ClientError(
            ErrorCode.MESSAGE_TOO_LONG,
            f'"message" has {len(message)} characters; the most is {max_text}',
        )
    return message


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


def _redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for each inline ``<tag>`` of ``html``."""
    hashes = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL):
        digest = hashlib.sha256(body.encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return hashes


_BACKEND_METRICS: Final = (
    ("reconnects", "chat_backend_reconnects_total", "counter",
     "Times the backend reached its broker again after an outage."),
    ("publish_failures", "chat_backend_publish_failures_total", "counter",
     "Publishes the broker could not take (the sender got an 'unavailable' error)."),
    ("data_losses", "chat_backend_data_losses_total", "counter",
     "Times the broker came back without its data (resuming clients get history_lost)."),
    ("gaps", "chat_backend_gaps_total", "counter",
     "Times this node found envelopes trimmed from history before it could read them."),
    ("reaped_nodes", "chat_backend_reaped_nodes_total", "counter",
     "Dead nodes whose presence this node removed."),
    ("rooms", "chat_backend_rooms", "gauge", "Rooms this node reads from the broker."),
)  # fmt: skip
"""``health()`` keys exported when the backend reports them: (key, metric, type, help)."""

_MANAGER_METRICS: Final = (
    ("connections", "chat_connections", "gauge", "Open WebSocket connections."),
    ("rooms", "chat_rooms", "gauge", "Rooms with at least one connection."),
    ("published", "chat_envelopes_published_total", "counter",
     "Envelopes published (messages, joins and leaves)."),
    ("delivered", "chat_deliveries_total", "counter", "Frames written to sockets."),
    ("dropped", "chat_drops_total", "counter", "Frames queued for a client but never written."),
    ("slow_consumer_disconnects", "chat_slow_consumer_disconnects_total", "counter",
     "Connections closed with 4008 because their queue was full."),
    ("send_failures", "chat_send_failures_total", "counter",
     "Connections closed because a send to them failed."),
)  # fmt: skip
"""The manager's :class:`~wsbroadcast.ManagerStats`: (attribute, metric, type, help)."""

_Family = tuple[str, str, str, list[tuple[str, int]]]


def _backend_families(health: dict[str, JsonValue]) -> list[_Family]:
    """Metric families for the backend's state: ``chat_backend_connected`` always, the
    counters of :data:`_BACKEND_METRICS` when ``health()`` has them (the Redis backend)."""
    families: list[_Family] = [
        (
            "chat_backend_connected",
            "gauge",
            "1 while the backend is healthy (Redis: reachable), else 0.",
            [("", int(health.get("status") == "ok"))],
        )
    ]
    for key, name, kind, help in _BACKEND_METRICS:
        value = health.get(key)
        if isinstance(value, int):
            families.append((name, kind, help, [("", int(value))]))
    return families


def _size(frame: str | bytes) -> int:
    """A frame's size on the wire, in bytes."""
    return len(frame.encode()) if isinstance(frame, str) else len(frame)


@dataclass
class _Counters:
    messages: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class HttpResponse:
    """A plain HTTP response, which each front end turns into its server's own type."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: JsonValue, status: int = HTTPStatus.OK) -> HttpResponse:
        """A compact UTF-8 JSON response."""
        body = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return cls(status, "application/json", body.encode())


@dataclass(frozen=True)
class Handshake:
    """What a front end read from a WebSocket handshake, for :meth:`ChatService.check_handshake`."""

    path: str
    """The request's path, for the log."""
    client_id: str
    """The ``{client_id}`` of ``/ws/{client_id}``, percent-decoded."""
    query: Mapping[str, str]
    """The query string's parameters (the last value of each)."""
    origin: str | None
    """The ``Origin`` header."""
    host: str | None
    """The ``Host`` header."""
    secure: bool
    """Whether the request came over TLS."""


@dataclass(frozen=True)
class ChatRequest:
    """A WebSocket handshake that passed every check: who joins which room, from where."""

    client_id: str
    room: str
    since: int | None
    """The last seq the client saw (resume), or None for the live stream only."""


@dataclass(frozen=True)
class Refusal:
    """Why a WebSocket handshake is refused (an HTTP 403 on every front end)."""

    reason: str
    """One of :data:`REFUSALS`, counted in ``/metrics``."""
    detail: str
    """For the log."""


class FrameTooBig(Exception):
    """Raised by :meth:`ChatSocket.receive` when the server closed the connection with 1009
    itself, because the client sent a frame over ``max_message_bytes``."""


class ChatSocket(Protocol):
    """One client's WebSocket, as a front end hands it to :meth:`ChatService.serve`.

    Writing goes through :attr:`transport` (the manager's), reading through :meth:`receive`:
    the service needs nothing else from a server.
    """

    gone: tuple[type[Exception], ...]
    """The exceptions the transport raises when the client has left."""

    @property
    def transport(self) -> Transport:
        """What the manager writes to; ``accept`` completes the handshake if not done yet."""
        ...

    async def receive(self) -> str | bytes | None:
        """The client's next frame (``str`` for text, ``bytes`` for binary), or None once the
        client has left; :class:`FrameTooBig` if the server refused an oversized frame."""
        ...


class ChatService:
    """The chat app without a web server: settings, the running manager, counters, the HTTP
    routes' bodies and the WebSocket protocol of one connection, for every front end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager: ConnectionManager | None = None
        self.counters = _Counters()
        html = CHAT_HTML.read_text(encoding="utf-8")
        csp = [
            "default-src 'none'",
            f"script-src {' '.join(_inline_hashes(html, 'script'))}",
            f"style-src {' '.join(_inline_hashes(html, 'style'))}",
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
        self._index = HttpResponse(
            HTTPStatus.OK,
            "text/html; charset=utf-8",
            html.encode(),
            {
                "Content-Security-Policy": "; ".join(csp),
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache",
            },
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run a fresh manager for as long as the server serves; leaving closes every
        connection with 1001 (Going Away)."""
        settings = self.settings
        manager = ConnectionManager(
            settings.backend_url(),
            queue_size=settings.queue_size,
            slow_consumer=settings.slow_consumer,
        )
        async with manager:
            self.manager = manager
            logger.info("chat app running with backend %s", _redact(settings.backend_url()))
            try:
                yield
            finally:
                self.manager = None

    # HTTP routes

    def index(self) -> HttpResponse:
        """``GET /``: the chat page, with a CSP that allows only its own inline code."""
        return self._index

    def healthz(self) -> HttpResponse:
        """``GET /healthz``: 200 ``{"status": "ok", ...}``, or 503 with ``"degraded"``.

        Degraded while the backend's ``health()`` is not ok (Redis unreachable): meant for a
        readiness check, since the process keeps its connections and recovers by itself.
        """
        manager = self.manager
        if manager is None:
            return HttpResponse.json({"status": "unavailable"}, HTTPStatus.SERVICE_UNAVAILABLE)
        backend = manager.backend.health()
        stats = manager.stats()
        ok = backend.get("status") == "ok"
        body: dict[str, JsonValue] = {
            "status": "ok" if ok else "degraded",
            "backend": backend,
            "connections": stats.connections,
            "rooms": stats.rooms,
        }
        return HttpResponse.json(body, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def metrics(self) -> HttpResponse:
        """``GET /metrics``: counters and gauges in the Prometheus text format."""
        manager = self.manager
        counters = self.counters
        families: list[_Family] = [
            ("chat_up", "gauge", "1 while the manager runs.", [("", int(manager is not None))])
        ]
        if manager is not None:
            families += _backend_families(manager.backend.health())
            stats = manager.stats()
            families += [
                (name, kind, help, [("", getattr(stats, key))])
                for key, name, kind, help in _MANAGER_METRICS
            ]
        families += [
            (
                "chat_messages_published_total",
                "counter",
                "Chat messages accepted and broadcast.",
                [("", counters.messages)],
            ),
            (
                "chat_errors_total",
                "counter",
                "Error frames sent to clients, by code.",
                [(f'{{code="{code}"}}', counters.errors[code]) for code in ERROR_CODES],
            ),
            (
                "chat_connections_refused_total",
                "counter",
                "Handshakes refused, and connections closed for breaking a rule, by reason.",
                [(f'{{reason="{reason}"}}', counters.refused[reason]) for reason in REFUSALS],
            ),
        ]
        lines: list[str] = []
        for name, kind, help, samples in families:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)
        body = "\n".join(lines) + "\n"
        return HttpResponse(
            HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", body.encode()
        )

    async def room(self, name: str) -> HttpResponse:
        """``GET /rooms/{room}``: who is online and the room's last seq."""
        if not valid_name(name):
            error = "room must be 1-64 characters of A-Z a-z 0-9 _ . -"
            return HttpResponse.json({"error": error}, HTTPStatus.BAD_REQUEST)
        manager = self.manager
        if manager is None:
            return HttpResponse.json(
                {"error": "server not running"}, HTTPStatus.SERVICE_UNAVAILABLE
            )
        try:
            online = await manager.presence(name)
            # A since beyond any seq reads no envelopes but still reports the last seq.
            history = await manager.backend.history(name, 2**62)
        except BackendError as exc:
            logger.warning("GET /rooms/%s: %s", name, exc)
            return HttpResponse.json(
                {"error": "backend unavailable"}, HTTPStatus.SERVICE_UNAVAILABLE
            )
        body: dict[str, JsonValue] = {"room": name, "online": list(online), "seq": history.last_seq}
        return HttpResponse.json(body)

    # The WebSocket route

    def check_handshake(self, handshake: Handshake) -> ChatRequest | Refusal:
        """Check ``WS /ws/{client_id}?room=NAME&since=SEQ`` before the server accepts it.

        A refusal is counted and logged here; the front end answers it with HTTP 403.
        """
        checked = self._check(handshake)
        if isinstance(checked, Refusal):
            self.counters.refused[checked.reason] += 1
            logger.info("refused WebSocket %s: %s", handshake.path, checked.detail)
        return checked

    def _check(self, handshake: Handshake) -> ChatRequest | Refusal:
        client_id, query, origin = handshake.client_id, handshake.query, handshake.origin
        room = query.get("room", "lobby")
        since_text = query.get("since")
        if not valid_name(client_id) or not valid_name(room):
            return Refusal("bad_name", "bad client id or room")
        since: int | None = None
        if since_text is not None:
            if _SINCE.fullmatch(since_text) is None:
                return Refusal("bad_since", "since must be an integer >= 0")
            since = int(since_text)
        secure, allowed = handshake.secure, self.settings.allowed_origins
        if not origin_allowed(origin, handshake.host, secure, allowed):
            return Refusal("forbidden_origin", f"origin {origin!r} not allowed")
        return ChatRequest(client_id, room, since)

    async def serve(self, request: ChatRequest, socket: ChatSocket) -> None:
        """Run one client's connection: join, then publish its good frames and answer its bad
        ones until it leaves or the manager closes it, then leave."""
        manager = self.manager
        transport = socket.transport
        if manager is None:
            await transport.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        client_id, room = request.client_id, request.room
        try:
            since = await self._check_stream(manager, transport, room, request.since)
            connection = await manager.connect(transport, client_id, room, since=since)
        except BackendError as exc:
            self.counters.refused["unavailable"] += 1
            logger.warning("refused %s in room %s: %s", client_id, room, exc)
            await self._close_unavailable(socket)
            return
        except ManagerNotRunning:  # the server began shutting down during the handshake
            await transport.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        except InvalidInput as exc:  # checked at the handshake already; kept as a safety net
            logger.info("refused WebSocket: %s", exc)
            await transport.close(CloseCode.POLICY_VIOLATION, "invalid name")
            return
        except socket.gone:  # the client left during the handshake
            return
        try:
            # Stops receiving once the manager closed the connection (slow consumer, shutdown).
            with connection.cancel_on_close():
                await self._receive(manager, socket, connection)
        finally:
            with anyio.CancelScope(shield=True):
                await manager.disconnect(connection)

    @staticmethod
    async def _close_unavailable(socket: ChatSocket) -> None:
        """Close with 1011 after accepting (unless the manager closed the socket already).

        Accepting first makes it a WebSocket close the client can read, not an HTTP 403
        that would read as "forbidden".
        """
        transport = socket.transport
        with contextlib.suppress(RuntimeError, *socket.gone):
            await transport.accept()
            await transport.close(CloseCode.INTERNAL_ERROR, "backend unavailable")

    @staticmethod
    async def _check_stream(
        manager: ConnectionManager, transport: Transport, room: str, since: int | None
    ) -> int | None:
        """Handle a ``since`` that is ahead of the room: the stream restarted under the client.

        That happens when the server restarted with the memory backend. The core would report
        ``history_lost`` but then skip the new stream up to ``since``; instead the client is
        told first and then gets the new stream from its start (``since=0``).
        """
        if not since:
            return since
        history = await manager.backend.history(room, 2**62)
        if since <= history.last_seq:
            return since
        await transport.accept()
        lost: dict[str, JsonValue] = {
            "since": since,
            "first_seq": history.first_seq,
            "last_seq": history.last_seq,
        }
        await transport.send_text(control_frame("history_lost", room, lost))
        return 0

    def _error(self, connection: Connection, error: ClientError) -> None:
        self.counters.errors[error.code] += 1
        connection.send_error(error.code, error.detail)

    async def _receive(
        self, manager: ConnectionManager, socket: ChatSocket, connection: Connection
    ) -> None:
        """Read the client's frames until it leaves; publish the good ones, answer the bad."""
        settings = self.settings
        limiter = RateLimiter(settings.rate_limit) if settings.rate_limit > 0 else None
        max_bytes = settings.max_message_bytes
        while connection.state is ConnectionState.OPEN:
            try:
                frame = await socket.receive()
                too_big = frame is not None and _size(frame) > max_bytes
            except FrameTooBig:
                frame, too_big = None, True
            if too_big:
                self.counters.refused["message_too_big"] += 1
                await manager.disconnect(
                    connection,
                    CloseCode.MESSAGE_TOO_BIG,
                    f"frames are limited to {max_bytes} bytes",
                )
                return
            if frame is None:
                return
            if limiter is not None and not limiter.allow():
                detail = (
                    f"at most {settings.rate_limit:g} messages per second; this one was dropped"
                )
                self._error(connection, ClientError(ErrorCode.RATE_LIMITED, detail))
                continue
            if isinstance(frame, bytes):
                detail = 'send text frames holding JSON {"message": ...}'
                self._error(connection, ClientError(ErrorCode.BINARY_FRAME, detail))
                continue
            result = parse_client_frame(frame, settings.max_text)
            if isinstance(result, ClientError):
                self._error(connection, result)
                continue
            try:
                await manager.broadcast(connection.room, {"message": result}, connection.client_id)
            except BackendError as exc:
                logger.warning("message from %r not published: %s", connection, exc)
                detail = "the message could not be published (backend unavailable); try again"
                self._error(connection, ClientError(ErrorCode.UNAVAILABLE, detail))
            except WSBroadcastError as exc:
                logger.warning("message from %r not published: %s", connection, exc)
            else:
                self.counters.messages += 1
