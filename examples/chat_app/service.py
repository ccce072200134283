"""The chat app's protocol, whatever server runs it: `ChatService` and its socket types.

Routes (documented in ``docs/protocol.md``, "The chat app's WebSocket protocol")::

    GET  /              chat.html
    GET  /healthz       {"status": "ok", ...}
    GET  /metrics       Prometheus text format
    GET  /rooms/{room}  {"room", "online", "seq"}
    POST /api/rooms/{room}/messages
    WS   /ws/{client_id}?room=NAME&since=SEQ&epoch=EPOCH&dm_since=SEQ&dm_epoch=EPOCH

A connection starts in ``room`` and in the client's personal stream ``@client_id`` (where
its direct messages arrive, on every tab; ``dm_since`` and ``dm_epoch`` resume it as
``since`` and ``epoch`` resume the room). Its frames (`parse_command`) say a message
to its first room or to another room it is in, join or leave rooms (``--max-rooms`` at
most), or send a direct message; they are handled one at a time, in the order sent.

Everything a client sends is checked at the edge before it reaches the manager: names,
``since`` and ``epoch`` at the handshake (refused with HTTP 403), the ``Origin`` header
against cross-site WebSocket hijacking, connections per IP address (HTTP 429), and every
frame for size, rate (per client id across its tabs and nodes, and per IP address), JSON
shape and text length, and the rooms it may join (another client's personal stream, the
JWT's ``rooms`` claim). A client's mistake gets an unsequenced error frame on its own
connection, never a traceback in the log.

Nothing here imports a web server. A front end (`examples.chat_app.app` on Starlette,
`examples.chat_app.websockets_server` on the ``websockets`` library) matches the routes,
turns `HttpResponse` into its own response type and hands each WebSocket to
`ChatService.serve` as a `ChatSocket`; so the protocol is written once.

This module holds `ChatService`, the types a front end hands it (`Handshake`,
`ChatSocket`, `FrameTooBig`) and what it hands back (`ChatRequest`); the
rest is split by concept, and the names below are re-exported from here as before:

- `examples.chat_app.settings`: `Settings`;
- `examples.chat_app.edge`: the checks (`parse_client_frame`,
  `origin_allowed`, `check_token`, `RateLimiter`, `valid_name`) and
  what they answer (`ClientError`, `ErrorCode`, `Refusal`);
- `examples.chat_app.responses`: `HttpResponse`;
- `examples.chat_app.metrics`: the ``/metrics`` collector of the chat app's counters.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import anyio
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import JsonValue

from wsbroadcast import (
    NAME_CHARACTERS,
    NAME_MAX_LENGTH,
    AlreadyJoined,
    BackendError,
    CloseCode,
    Connection,
    ConnectionManager,
    ConnectionState,
    Envelope,
    Forbidden,
    InvalidData,
    InvalidInput,
    InvalidName,
    ManagerNotRunning,
    NotJoined,
    Transport,
    WSBroadcastError,
    is_user_room,
    user_room,
)
from wsbroadcast.envelope import EPOCH_PATTERN
from wsbroadcast.gcpauses import GCPauses
from wsbroadcast.metrics import GCPausesCollector, ManagerCollector

from .edge import (
    _SINCE,
    ClientError,
    Command,
    Direct,
    ErrorCode,
    Join,
    Leave,
    RateLimiter,
    Refusal,
    Say,
    _LocalBuckets,
    _size,
    check_token,
    origin_allowed,
    parse_client_frame,
    parse_command,
    room_allowed,
    token_rooms,
    valid_name,
)
from .metrics import _METRIC_NAMES, _ChatCollector, _Counters, _integral
from .responses import HttpResponse, _api_error, chat_page
from .settings import Settings

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
    "check_token",
    "origin_allowed",
    "parse_client_frame",
    "parse_command",
    "valid_name",
]

logger = logging.getLogger("examples.chat_app")

CHAT_HTML: Final = Path(__file__).with_name("static") / "chat.html"
CLOSE_WAIT: Final = 1.0
"""Seconds to wait for a close frame to be written before giving up on the socket."""
TRY_AGAIN_LATER: Final = 1013
"""Close code for a connection over the per-IP cap that passed the handshake in a race."""
PERSONAL_RETRY_FIRST: Final = 0.5
PERSONAL_RETRY_MAX: Final = 8.0
"""Seconds between attempts to join a personal stream that the backend refused: from the
first, doubling up to the most."""


class _OutageLog:
    """One WARNING per backend outage, however many operations fail during it.

    The first failure is logged as a warning; the next ones, until an operation succeeds
    again, at DEBUG; the first success after an outage is logged at INFO. While an outage
    lasts, it also quiets the manager's per-connection warnings about departures it could
    not announce (see `filter`).
    """

    _QUIETED = ("could not announce the departure of", "announcing the departure of")

    def __init__(self) -> None:
        self.down = False

    def failed(self, what: str, exc: BaseException) -> None:
        """Log that ``what`` failed because the backend did."""
        if self.down:
            logger.debug("%s: %s", what, exc)
            return
        self.down = True
        logger.warning(
            "backend unavailable (%s: %s); until it is back, failures are logged at DEBUG",
            what,
            exc,
        )

    def worked(self) -> None:
        """An operation on the backend succeeded: end the outage, if there was one."""
        if self.down:
            self.down = False
            logger.info("backend available again")

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter for ``wsbroadcast``: demote per-connection departure warnings to
        DEBUG while the backend is down (one line per connection would flood the log)."""
        if self.down and record.levelno == logging.WARNING:
            message = str(record.msg)
            if message.startswith(self._QUIETED):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


@dataclass(frozen=True)
class Handshake:
    """What a front end read from a WebSocket handshake, for `ChatService.check_handshake`."""

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
    client_ip: str | None = None
    """The peer's IP address (None if the server does not say), for the per-IP limits."""


@dataclass(frozen=True)
class ChatRequest:
    """A WebSocket handshake that passed every check: who joins which room, from where."""

    client_id: str
    room: str
    since: int | None
    """The last seq the client saw (resume), or None for the live stream only."""
    epoch: str | None = None
    """The epoch of the client's last envelope (with ``since``), or None."""
    client_ip: str | None = None
    """The peer's IP address, for the per-IP limits."""
    dm_since: int | None = None
    """``since`` for the client's personal stream (its direct messages), or None."""
    dm_epoch: str | None = None
    """``epoch`` for the client's personal stream, or None."""
    rooms: tuple[str, ...] | None = None
    """The rooms its token allows (``*`` wildcards), for the rooms it joins later; None: any."""


class FrameTooBig(Exception):
    """Raised by `ChatSocket.receive` when the server closed the connection with 1009
    itself, because the client sent a frame over ``max_message_bytes``."""


class ChatSocket(Protocol):
    """One client's WebSocket, as a front end hands it to `ChatService.serve`.

    Writing goes through `transport` (the manager's), reading through `receive`:
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
        client has left; `FrameTooBig` if the server refused an oversized frame."""
        ...


class ChatService:
    """The chat app without a web server: settings, the running manager, counters, the HTTP
    routes' bodies and the WebSocket protocol of one connection, for every front end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager: ConnectionManager | None = None
        self.counters = _Counters()
        self.write_buffer_overflows: Callable[[], int] = lambda: 0
        """The front end's count of connections closed for a full write buffer."""
        self.registry = CollectorRegistry()
        """What ``/metrics`` reports: the chat app's counters, and the manager's while it runs."""
        self.registry.register(_ChatCollector(self))
        self.outage = _OutageLog()
        self._local_buckets = _LocalBuckets()
        self._per_ip: Counter[str] = Counter()
        self._index = chat_page(CHAT_HTML.read_text(encoding="utf-8"))

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
        core_logger = logging.getLogger("wsbroadcast")
        core_logger.addFilter(self.outage.filter)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if settings.gc_freeze is not None:
                    pauses = await stack.enter_async_context(GCPauses(freeze=settings.gc_freeze))
                    gc_collector = GCPausesCollector(pauses, "chat")
                    self.registry.register(gc_collector)
                    stack.callback(self.registry.unregister, gc_collector)
                await stack.enter_async_context(manager)
                self.manager = manager
                collector = ManagerCollector(manager, "chat", names=_METRIC_NAMES)
                self.registry.register(collector)
                logger.info("chat app running with backend %s", _redact(settings.backend_url()))
                try:
                    yield
                finally:
                    self.manager = None
                    self.registry.unregister(collector)
        finally:
            core_logger.removeFilter(self.outage.filter)

    # HTTP routes

    def index(self) -> HttpResponse:
        """``GET /``: the chat page, with a CSP that allows only its own inline code and the
        client module it imports."""
        return self._index

    def healthz(self) -> HttpResponse:
        """``GET /healthz``: 200 ``{"status": "ok", ...}``, or 503 with ``"degraded"``.

        Degraded while the backend's ``health()`` is not ok (Redis unreachable): meant for a
        readiness check, since the process keeps its connections and recovers by itself.
        """
        manager = self.manager
        if manager is None:
            return HttpResponse.json({"status": "unavailable"}, HTTPStatus.SERVICE_UNAVAILABLE)
        health = manager.backend.health()
        statistics = manager.statistics()
        ok = health.ok
        body: dict[str, JsonValue] = {
            "status": "ok" if ok else "degraded",
            "backend": health.as_dict(),
            "connections": statistics.connections,
            "rooms": statistics.rooms,
        }
        return HttpResponse.json(body, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def metrics(self) -> HttpResponse:
        """``GET /metrics``: counters and gauges in the Prometheus text format."""
        return HttpResponse(
            HTTPStatus.OK,
            "text/plain; version=0.0.4; charset=utf-8",
            _integral(generate_latest(self.registry)),
        )

    async def room(self, name: str) -> HttpResponse:
        """``GET /rooms/{room}``: who is online and the room's last seq."""
        if not valid_name(name):
            error = f"room must be 1-{NAME_MAX_LENGTH} characters of {NAME_CHARACTERS}"
            return HttpResponse.json({"error": error}, HTTPStatus.BAD_REQUEST)
        if is_user_room(name):
            error = "a personal stream (@client_id) is private: it has no presence to show"
            return HttpResponse.json({"error": error}, HTTPStatus.FORBIDDEN)
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
            self.outage.failed(f"GET /rooms/{name}", exc)
            return HttpResponse.json(
                {"error": "backend unavailable"}, HTTPStatus.SERVICE_UNAVAILABLE
            )
        self.outage.worked()
        body: dict[str, JsonValue] = {"room": name, "online": list(online), "seq": history.last_seq}
        return HttpResponse.json(body)

    async def publish(
        self, room: str, authorization: str | None, content_type: str | None, body: bytes
    ) -> HttpResponse:
        """``POST /api/rooms/{room}/messages``: publish ``{"message": text}`` as the server.

        Off (404) unless `Settings.api_keys` is set; 401 without a valid
        ``Authorization: Bearer KEY``; 400 for a bad room or a personal stream. The body is
        checked as a WebSocket frame is, with the same error codes (400
        ``{"error": {"code", "detail"}}``, 413 over
        ``max_message_bytes``); 202 with the envelope, whose ``client_id`` is null (the server).
        """
        keys = self.settings.api_keys
        if not keys:
            return HttpResponse.json({"error": "not found"}, HTTPStatus.NOT_FOUND)
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(given.strip().encode(), key.encode()) for key in keys
        ):
            return HttpResponse(
                HTTPStatus.UNAUTHORIZED,
                "application/json",
                b'{"error":"a valid Authorization: Bearer key is required"}',
                {"WWW-Authenticate": 'Bearer realm="chat"'},
            )
        if not valid_name(room):
            error = f"room must be 1-{NAME_MAX_LENGTH} characters of {NAME_CHARACTERS}"
            return HttpResponse.json({"error": error}, HTTPStatus.BAD_REQUEST)
        if is_user_room(room):
            error = "a personal stream (@client_id) takes direct messages only"
            return HttpResponse.json({"error": error}, HTTPStatus.BAD_REQUEST)
        if content_type is None or content_type.split(";")[0].strip() != "application/json":
            return _api_error(
                ClientError(ErrorCode.INVALID_JSON, "send Content-Type: application/json"),
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
        if len(body) > self.settings.max_message_bytes:
            detail = f"the body is limited to {self.settings.max_message_bytes} bytes"
            return _api_error(
                ClientError("message_too_big", detail), HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _api_error(ClientError(ErrorCode.INVALID_JSON, "the body is not UTF-8"))
        result = parse_client_frame(text, self.settings.max_text)
        if isinstance(result, ClientError):
            self.counters.errors[result.code] += 1
            return _api_error(result)
        manager = self.manager
        if manager is None:
            return HttpResponse.json(
                {"error": "server not running"}, HTTPStatus.SERVICE_UNAVAILABLE
            )
        try:
            envelope = await manager.broadcast(room, {"message": result})
        except InvalidData:
            detail = '"message" cannot be encoded as text (a lone UTF-16 surrogate?)'
            refused = ClientError(ErrorCode.INVALID_MESSAGE, detail)
            self.counters.errors[refused.code] += 1
            return _api_error(refused)
        except BackendError as exc:
            self.outage.failed(f"POST /api/rooms/{room}/messages", exc)
            detail = "the message could not be published (backend unavailable); try again"
            return _api_error(
                ClientError(ErrorCode.UNAVAILABLE, detail), HTTPStatus.SERVICE_UNAVAILABLE
            )
        self.outage.worked()
        self.counters.messages += 1
        return HttpResponse(HTTPStatus.ACCEPTED, "application/json", envelope.text.encode())

    # The WebSocket route

    def check_handshake(self, handshake: Handshake) -> ChatRequest | Refusal:
        """Check ``WS /ws/{client_id}?room=NAME&since=SEQ&epoch=E&dm_since=SEQ&dm_epoch=E``
        before the server accepts it.

        A refusal is counted and logged here; the front end answers it with its HTTP status.
        """
        checked = self._check(handshake)
        if isinstance(checked, Refusal):
            self.counters.refused[checked.reason] += 1
            logger.info("refused WebSocket %s: %s", handshake.path, checked.detail)
        return checked

    def _check(self, handshake: Handshake) -> ChatRequest | Refusal:
        client_id, query, origin = handshake.client_id, handshake.query, handshake.origin
        room = query.get("room", "lobby")
        if not valid_name(client_id) or not valid_name(room):
            return Refusal("bad_name", "bad client id or room")
        if is_user_room(room):
            # The server joins the client's own personal stream itself; nobody else's.
            return Refusal("forbidden_room", f"room {room!r} is a personal stream")
        resume: list[tuple[int | None, str | None]] = []
        for since_key, epoch_key in (("since", "epoch"), ("dm_since", "dm_epoch")):
            since_text = query.get(since_key)
            since: int | None = None
            if since_text is not None:
                if _SINCE.fullmatch(since_text) is None:
                    return Refusal("bad_since", f"{since_key} must be an integer >= 0")
                since = int(since_text)
            epoch = query.get(epoch_key)
            if epoch is not None and EPOCH_PATTERN.fullmatch(epoch) is None:
                return Refusal("bad_epoch", f"{epoch_key} must be 1-32 of A-Z a-z 0-9 _ -")
            resume.append((since, epoch))
        (since, epoch), (dm_since, dm_epoch) = resume
        secure, allowed = handshake.secure, self.settings.allowed_origins
        if not origin_allowed(origin, handshake.host, secure, allowed):
            return Refusal("forbidden_origin", f"origin {origin!r} not allowed")
        secret = self.settings.jwt_secret
        rooms: tuple[str, ...] | None = None
        if secret is not None:
            token = query.get("token")
            refused = check_token(token, secret, client_id, room)
            if refused is not None:
                return Refusal("bad_token", refused)
            rooms = token_rooms(token or "", secret, client_id)
        ip = handshake.client_ip
        cap = self.settings.max_connections_per_ip
        if cap and ip is not None and self._per_ip[ip] >= cap:
            detail = f"{ip} has {cap} connections open already"
            return Refusal("too_many_connections", detail, HTTPStatus.TOO_MANY_REQUESTS)
        return ChatRequest(client_id, room, since, epoch, ip, dm_since, dm_epoch, rooms)

    async def serve(self, request: ChatRequest, socket: ChatSocket) -> None:
        """Run one client's connection: connect it to its room and join its personal stream,
        then carry out its good frames and answer its bad ones until it leaves or the manager
        closes it, then disconnect."""
        ip = request.client_ip
        if ip is None:
            await self._serve(request, socket)
            return
        # Counted from here, with no await before the check, so that the handshake's check
        # and this count cannot be raced on uvicorn; on websockets, handshakes checked
        # together may all get here, and those over the cap are closed with 1013.
        self._per_ip[ip] += 1
        try:
            cap = self.settings.max_connections_per_ip
            if cap and self._per_ip[ip] > cap:
                self.counters.refused["too_many_connections"] += 1
                logger.info("refused WebSocket from %s: over %d connections", ip, cap)
                with contextlib.suppress(RuntimeError, *socket.gone):
                    await socket.transport.close(TRY_AGAIN_LATER, "too many connections")
                return
            await self._serve(request, socket)
        finally:
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]

    async def _serve(self, request: ChatRequest, socket: ChatSocket) -> None:
        manager = self.manager
        transport = socket.transport
        if manager is None:
            await transport.close(CloseCode.GOING_AWAY, "server shutting down")
            return
        client_id, room = request.client_id, request.room
        try:
            connection = await manager.connect(
                transport, client_id, room, since=request.since, epoch=request.epoch
            )
        except BackendError as exc:
            self.counters.refused["unavailable"] += 1
            self.outage.failed(f"connect {client_id} to room {room}", exc)
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
        self.outage.worked()
        try:
            # Stops receiving once the manager closed the connection (slow consumer, shutdown).
            with connection.cancel_on_close():
                if await self._join_personal(manager, connection, request):
                    await self._receive(manager, socket, connection, request)
                else:
                    async with anyio.create_task_group() as task_group:
                        task_group.start_soon(self._rejoin_personal, manager, connection, request)
                        await self._receive(manager, socket, connection, request)
                        task_group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await manager.disconnect(connection)
            if getattr(transport, "aborted", False):
                self.counters.close_aborts += 1

    async def _join_personal(
        self, manager: ConnectionManager, connection: Connection, request: ChatRequest
    ) -> bool:
        """Join the client's personal stream, resuming it after ``dm_since``, before any of
        its frames is read (so that a direct message it sends reaches this tab too).

        False if the backend failed: the client gets an ``unavailable`` error about the
        stream, and the connection stays open (a backend outage closes no connection).
        """
        personal = user_room(connection.client_id)
        try:
            await manager.join(connection, personal, since=request.dm_since, epoch=request.dm_epoch)
        except BackendError as exc:
            self.outage.failed(f"join {connection!r} to its personal stream", exc)
            detail = "direct messages cannot be received until the backend is back; retrying"
            self._error(connection, ClientError(ErrorCode.UNAVAILABLE, detail, personal))
            return False
        except WSBroadcastError as exc:  # shutting down, or a bug: no retry
            logger.info("%r did not join its personal stream: %s", connection, exc)
        else:
            self.outage.worked()
        return True

    async def _rejoin_personal(
        self, manager: ConnectionManager, connection: Connection, request: ChatRequest
    ) -> None:
        """Join the personal stream again, with backoff, until it works or the connection
        closes; its ``joined`` frame tells the client. Nothing of the stream was sent yet,
        so it resumes from the handshake's ``dm_since`` still."""
        personal = user_room(connection.client_id)
        delay = PERSONAL_RETRY_FIRST
        while connection.state is ConnectionState.OPEN:
            await anyio.sleep(delay)
            delay = min(2 * delay, PERSONAL_RETRY_MAX)
            try:
                await manager.join(
                    connection, personal, since=request.dm_since, epoch=request.dm_epoch
                )
            except BackendError as exc:
                self.outage.failed(f"join {connection!r} to its personal stream", exc)
            except WSBroadcastError as exc:
                logger.info("%r did not join its personal stream: %s", connection, exc)
                return
            else:
                self.outage.worked()
                return

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

    def _error(self, connection: Connection, error: ClientError) -> None:
        self.counters.errors[error.code] += 1
        connection.send_error(error.code, error.detail, error.room)

    async def _allow(self, manager: ConnectionManager, key: str, rate: float) -> bool:
        """Take a token from the backend's bucket ``key`` (shared by every node on Redis).

        Fails open to a bucket in this process while the backend cannot answer, so that an
        outage neither stops the chat nor lifts the limit.
        """
        try:
            allowed = await manager.backend.allow(key, rate, 2 * rate)
        except BackendError as exc:
            self.outage.failed("rate limit", exc)
            return self._local_buckets.allow(key, rate)
        return allowed

    async def _rate_limited(
        self, manager: ConnectionManager, connection: Connection, request: ChatRequest
    ) -> str | None:
        """Why this frame is over a rate limit (per client id, per IP), or None."""
        settings = self.settings
        rate = settings.rate_limit
        key = f"chat:rate:client:{connection.client_id}"
        if rate > 0 and not await self._allow(manager, key, rate):
            return f"at most {rate:g} messages per second per client id; this one was dropped"
        ip_rate = settings.effective_ip_rate_limit
        if ip_rate > 0 and request.client_ip is not None:
            key = f"chat:rate:ip:{request.client_ip}"
            if not await self._allow(manager, key, ip_rate):
                return (
                    f"at most {ip_rate:g} messages per second from one address; this one was"
                    " dropped"
                )
        return None

    async def _receive(
        self,
        manager: ConnectionManager,
        socket: ChatSocket,
        connection: Connection,
        request: ChatRequest,
    ) -> None:
        """Read the client's frames until it leaves; carry out the good ones, answer the bad.

        One frame at a time: each is done (a join's history queued, a message published)
        before the next is read, so a client's frames take effect in the order it sent them.
        """
        settings = self.settings
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
            limited = await self._rate_limited(manager, connection, request)
            if limited is not None:
                self._error(connection, ClientError(ErrorCode.RATE_LIMITED, limited))
                continue
            if isinstance(frame, bytes):
                detail = 'send text frames holding JSON {"message": ...}'
                self._error(connection, ClientError(ErrorCode.BINARY_FRAME, detail))
                continue
            command = parse_command(frame, settings.max_text)
            if isinstance(command, ClientError):
                self._error(connection, command)
                continue
            await self._carry_out(manager, connection, request, command)

    async def _carry_out(
        self,
        manager: ConnectionManager,
        connection: Connection,
        request: ChatRequest,
        command: Command,
    ) -> None:
        """Do what one good frame asks, or answer why it cannot be done."""
        client_id = connection.client_id
        if isinstance(command, Say):
            room = connection.room if command.room is None else command.room
            if is_user_room(room) or not connection.in_room(room):
                detail = f"you are not in room {room!r}: join it first"
                self._error(connection, ClientError(ErrorCode.NOT_JOINED, detail, room))
                return
            said: JsonValue = {"message": command.text}
            await self._publish(connection, room, manager.broadcast(room, said, client_id))
        elif isinstance(command, Direct):
            direct: JsonValue = {"message": command.text}
            sent = manager.send_direct(command.to, direct, client_id)
            await self._publish(connection, user_room(client_id), sent)
        elif isinstance(command, Join):
            error = await self._join(manager, connection, request, command)
            if error is not None:
                self._error(connection, error)
        else:
            error = await self._leave(manager, connection, command)
            if error is not None:
                self._error(connection, error)

    async def _publish(
        self, connection: Connection, room: str, publish: Awaitable[Envelope]
    ) -> None:
        """Await a message's publication, answering the sender's error (about ``room``) if
        it fails; a direct message is about the sender's personal stream."""
        try:
            await publish
        except BackendError as exc:
            self.outage.failed(f"message from {connection!r}", exc)
            detail = "the message could not be published (backend unavailable); try again"
            self._error(connection, ClientError(ErrorCode.UNAVAILABLE, detail, room))
        except InvalidData as exc:
            # ascii(): the refused text may hold the lone surrogate, which no log can print.
            logger.info("message from %r refused: %s", connection, ascii(str(exc)))
            detail = '"message" cannot be encoded as text (a lone UTF-16 surrogate?)'
            self._error(connection, ClientError(ErrorCode.INVALID_MESSAGE, detail, room))
        except InvalidName as exc:  # the recipient: checked by parse_command already
            detail = f"no such client id: {exc.reason}"
            self._error(connection, ClientError(ErrorCode.INVALID_RECIPIENT, detail, room))
        except WSBroadcastError as exc:
            logger.warning("message from %r not published: %s", connection, exc)
        else:
            self.outage.worked()
            self.counters.messages += 1

    async def _join(
        self,
        manager: ConnectionManager,
        connection: Connection,
        request: ChatRequest,
        command: Join,
    ) -> ClientError | None:
        """Join ``command.room`` (history after its ``since`` first), or say why not."""
        room = command.room
        personal = user_room(connection.client_id)
        rooms = connection.rooms
        forbidden = ErrorCode.FORBIDDEN_ROOM
        if is_user_room(room) and room != personal:
            return ClientError(forbidden, f"{room!r} is another client's personal stream", room)
        if room != personal and not room_allowed(request.rooms, room):
            return ClientError(forbidden, f"your token does not allow room {room!r}", room)
        if room in rooms:
            return ClientError(ErrorCode.ALREADY_JOINED, f"you are in room {room!r} already", room)
        limit = self.settings.max_rooms
        if len(rooms - {personal}) >= limit:
            detail = f"a connection may be in {limit} rooms at most: leave one first"
            return ClientError(ErrorCode.TOO_MANY_ROOMS, detail, room)
        try:
            await manager.join(connection, room, since=command.since, epoch=command.epoch)
        except AlreadyJoined:
            return ClientError(ErrorCode.ALREADY_JOINED, f"you are in room {room!r} already", room)
        except Forbidden as exc:
            return ClientError(forbidden, str(exc), room)
        except InvalidName as exc:  # checked by parse_command already: a safety net
            return ClientError(ErrorCode.INVALID_ROOM, exc.reason, None)
        except InvalidInput as exc:  # since or epoch, checked already: a safety net
            code = ErrorCode.BAD_EPOCH if "epoch" in str(exc) else ErrorCode.BAD_SINCE
            return ClientError(code, str(exc), room)
        except BackendError as exc:
            self.outage.failed(f"join {connection!r} to room {room}", exc)
            detail = f"could not join room {room!r} (backend unavailable); try again"
            return ClientError(ErrorCode.UNAVAILABLE, detail, room)
        except WSBroadcastError as exc:  # the manager is shutting down: the connection closes
            logger.info("%r not joined to room %s: %s", connection, room, exc)
            return None
        self.outage.worked()
        return None

    async def _leave(
        self, manager: ConnectionManager, connection: Connection, command: Leave
    ) -> ClientError | None:
        """Leave ``command.room``, or say why not (never the personal stream)."""
        room = command.room
        if room == user_room(connection.client_id):
            detail = "your personal stream (your direct messages) cannot be left"
            return ClientError(ErrorCode.FORBIDDEN_ROOM, detail, room)
        try:
            await manager.leave(connection, room)
        except NotJoined:
            return ClientError(ErrorCode.NOT_JOINED, f"you are not in room {room!r}", room)
        except BackendError as exc:
            self.outage.failed(f"leave {connection!r} from room {room}", exc)
            detail = f"could not leave room {room!r} (backend unavailable); try again"
            return ClientError(ErrorCode.UNAVAILABLE, detail, room)
        except WSBroadcastError as exc:
            logger.info("%r did not leave room %s: %s", connection, room, exc)
            return None
        self.outage.worked()
        return None
