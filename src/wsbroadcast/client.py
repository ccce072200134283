"""An asyncio (and trio) client that keeps wsbroadcast's guarantees end to end.

The server numbers every room's envelopes gap-free and resumes a client exactly from the
``(seq, epoch)`` it last saw, or says ``history_lost``. Only a client that tracks both per
room, resumes every room with them after each reconnect, drops duplicates, treats a seq gap
as loss and backs off with jitter gets those guarantees; this module is that client, for the
protocol of ``docs/protocol.md`` ("The chat app's WebSocket protocol"). It is the Python twin
of ``clients/js``: the same states, close codes, resume, dedupe and gap rules
(``docs/clients.md``).

Usage (``pip install "wsbroadcast[client]"``)::

    async with connect("ws://127.0.0.1:8000/ws/alice", rooms=["lobby"]) as client:
        await client.publish("lobby", "hello")
        async for envelope in client:
            print(envelope.room, envelope.seq, envelope.data)

It runs on asyncio and on trio (through ``websockets.asyncio`` and ``websockets.trio``,
chosen by the running event loop), with anyio for its own tasks.
"""

from __future__ import annotations

import contextlib
import enum
import json
import random as random_module
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from .envelope import Envelope
from .exceptions import WSBroadcastError

__all__ = [
    "GAP_CLOSE_CODE",
    "NO_RETRY_CODES",
    "Client",
    "ClientClosed",
    "ClientEvent",
    "ClientState",
    "Connected",
    "Connecting",
    "Disconnected",
    "Gap",
    "HistoryLost",
    "NotConnected",
    "Position",
    "ServerError",
    "Subscribed",
    "Unsubscribed",
    "backoff_delay",
    "connect",
]

NO_RETRY_CODES = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})
"""Close codes after which the client does not reconnect: the session was ended on purpose
(1000), or coming back would repeat the refusal (1002 protocol error, 1003 unsupported data,
1007 invalid payload, 1008 policy violation, 1009 too big, 1010 extension). Every other code
(1001, 1005, 1006, 1011, 1012, 1013, 1014, 4008, other 4xxx) is retried with backoff."""

GAP_CLOSE_CODE = 4000
"""The code the client closes with (reason ``gap``) to resume after a seq gap."""

_JOIN_REFUSALS = frozenset(
    {"forbidden_room", "too_many_rooms", "invalid_room", "bad_since", "bad_epoch"}
)
_RETRY_STATUSES = frozenset({408, 429})
"""HTTP answers to the handshake worth retrying; any other 4xx is final (403: refused)."""


def backoff_delay(
    attempt: int, min_delay: float, max_delay: float, random: Callable[[], float]
) -> float:
    """Full-jitter backoff: uniform in ``[0, min(max_delay, min_delay * 2 ** attempt))``.

    Clients cut off together (a server restart) come back spread out, not together.
    """
    return float(random() * min(max_delay, min_delay * 2 ** min(attempt, 31)))


class ClientState(str, enum.Enum):
    """The client's states (``DISCONNECTED`` also while a retry is scheduled)."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"


@dataclass(frozen=True)
class Position:
    """The last ``seq`` seen of a room and its stream's ``epoch``: what a resume sends."""

    seq: int | None
    epoch: str | None


@dataclass(frozen=True)
class Connecting:
    """An attempt to connect begins; ``attempt`` counts failures since frames last arrived."""

    attempt: int
    url: str


@dataclass(frozen=True)
class Connected:
    """The handshake succeeded; joins of the other rooms are on their way."""

    url: str


@dataclass(frozen=True)
class Disconnected:
    """The connection ended with ``code`` (1006: none, a refused handshake or a timeout).

    ``will_retry`` tells whether the client reconnects by itself, after ``delay`` seconds.
    """

    code: int
    reason: str
    will_retry: bool
    delay: float | None


@dataclass(frozen=True)
class Subscribed:
    """The connection is in ``room``, up to date with ``seq`` of stream ``epoch``."""

    room: str
    seq: int | None
    epoch: str | None
    resumed: bool
    recovered: bool | None


@dataclass(frozen=True)
class Unsubscribed:
    """The client left ``room``; ``code`` is the server's error code if a join was refused."""

    room: str
    code: str | None
    reason: str


@dataclass(frozen=True)
class HistoryLost:
    """Envelopes of ``room`` after ``since`` cannot be had: never a silent skip.

    The client adopted ``epoch`` and takes the next envelope whatever its seq.
    """

    room: str
    since: int | None
    epoch: str | None
    first_seq: int | None
    last_seq: int | None


@dataclass(frozen=True)
class Gap:
    """A live envelope of ``room`` skipped seqs: the client reconnects and resumes."""

    room: str
    expected: int
    received: int


@dataclass(frozen=True)
class ServerError:
    """An ``error`` frame: the server refused something this client sent."""

    room: str | None
    code: str
    detail: str


ClientEvent = (
    Connecting
    | Connected
    | Disconnected
    | Subscribed
    | Unsubscribed
    | HistoryLost
    | Gap
    | ServerError
)
"""What `Client.events` yields besides envelopes."""


class NotConnected(WSBroadcastError, ConnectionError):
    """A frame cannot be sent: the client is not connected (nothing is queued, since a frame
    sent again after a reconnect would be published twice)."""


class ClientClosed(WSBroadcastError, ConnectionError):
    """The server ended the session for good (a code in `NO_RETRY_CODES`, or a
    handshake refused with an HTTP status such as 403)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed for good with {code}: {reason}")
        self.code = code
        self.reason = reason


class _Socket(Protocol):
    async def recv(self) -> str | bytes: ...

    async def send(self, message: str) -> None: ...


class _Resume(Exception):
    """Raised inside the read loop: drop the connection and resume at once."""


class _Sub:
    """One room's bookkeeping (the personal stream's included)."""

    __slots__ = (
        "accept_any",
        "epoch",
        "lost",
        "personal",
        "resuming",
        "retrying",
        "room",
        "seq",
        "state",
    )

    def __init__(self, room: str, seq: int | None, epoch: str | None, personal: bool) -> None:
        self.room = room
        self.seq = seq
        self.epoch = epoch
        self.personal = personal
        self.state = "subscribing"
        self.accept_any = False
        self.resuming = False
        self.lost = False
        self.retrying = False


def _running_trio() -> bool:
    """Whether trio runs this task (trio needs sniffio, so without it this is asyncio)."""
    try:
        import sniffio
    except ImportError:  # pragma: no cover - trio is not installed either
        return False
    try:
        return bool(sniffio.current_async_library() == "trio")
    except sniffio.AsyncLibraryNotFoundError:  # pragma: no cover
        return False


def _open_socket(url: str, open_timeout: float) -> AbstractAsyncContextManager[Any]:
    """``websockets``' client for the running event loop (asyncio or trio)."""
    if _running_trio():
        from websockets.trio.client import connect as trio_connect

        return trio_connect(url, open_timeout=open_timeout, compression=None, proxy=None)
    from websockets.asyncio.client import connect as asyncio_connect

    return asyncio_connect(url, open_timeout=open_timeout, compression=None, proxy=None)


async def _close_socket(ws: Any, code: int, reason: str) -> None:
    close = getattr(ws, "aclose", None) or ws.close
    await close(code, reason)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _epoch(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class Client:
    """A wsbroadcast client: several rooms on one WebSocket, reconnected and resumed.

    Made by `connect`; use it as an async context manager. Iterate it for the
    envelopes of every subscribed room and of the personal stream (`Envelope`), each
    once and in each room's order; iterate `events` for envelopes and
    `ClientEvent` objects together. Iteration ends after `close`, and raises
    `ClientClosed` when the server ended the session for good.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        rooms: Iterable[str] | Mapping[str, Position] = (),
        min_reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 20.0,
        open_timeout: float = 10.0,
        max_queue: int = 1024,
        no_retry_codes: Iterable[int] = NO_RETRY_CODES,
        random: Callable[[], float] = random_module.random,
    ) -> None:
        self.url = url
        self._token = token
        self._min_delay = min_reconnect_delay
        self._max_delay = max_reconnect_delay
        self._open_timeout = open_timeout
        self._max_queue = max_queue
        self._no_retry = frozenset(no_retry_codes)
        self._random = random
        self._subs: dict[str, _Sub] = {}
        self._personal: str | None = None
        positions = (
            rooms if isinstance(rooms, Mapping) else dict.fromkeys(rooms, Position(None, None))
        )
        for room, position in positions.items():
            self._add(room, position.seq, position.epoch)
        self._state = ClientState.DISCONNECTED
        self._ws: _Socket | None = None
        self._url_room: str | None = None
        self._attempt = 0
        self._closing = False
        self._final: ClientClosed | None = None
        self._send: MemoryObjectSendStream[Envelope | ClientEvent]
        self._receive: MemoryObjectReceiveStream[Envelope | ClientEvent]
        self._task_group: anyio.abc.TaskGroup | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        """Whether the client is connected, connecting, or (for now or for good) not."""
        return self._state

    @property
    def personal_stream(self) -> str | None:
        """The personal stream's room (``@<client id>``) once the server named it."""
        return self._personal

    def position(self, room: str) -> Position | None:
        """Where the client is in ``room`` (what a resume sends), or None if not subscribed."""
        sub = self._subs.get(room)
        return None if sub is None else Position(sub.seq, sub.epoch)

    def rooms(self) -> dict[str, Position]:
        """Every subscribed room's position, the personal stream's included."""
        return {room: Position(sub.seq, sub.epoch) for room, sub in self._subs.items()}

    async def subscribe(
        self, room: str, *, since: int | None = None, epoch: str | None = None
    ) -> None:
        """Subscribe to ``room``, resuming after ``since`` of stream ``epoch`` if given.

        Returns once the join is sent (or recorded, when not connected: it is sent at the
        next connection); `Subscribed` or `Unsubscribed` (refused) follows in
        `events`. For the personal stream (``@<client id>``, which the server joins
        itself) it only sets where to resume it from.
        """
        existing = self._subs.get(room)
        if room.startswith("@"):
            if self._personal not in (None, room):
                raise ValueError(f"the personal stream is {self._personal}")
            sub = self._personal_sub(room)
            if sub.seq is None and since is not None:
                sub.seq, sub.epoch = since, epoch
            return
        if existing is not None and existing.state != "unsubscribing":
            return
        sub = self._add(room, since, epoch)
        if self._state is ClientState.CONNECTED and existing is None:
            await self._join(sub)

    async def unsubscribe(self, room: str) -> None:
        """Leave ``room``: its envelopes in flight are dropped, `Unsubscribed` follows."""
        sub = self._subs.get(room)
        if sub is None or sub.personal or sub.state == "unsubscribing":
            return
        if self._state is ClientState.CONNECTED:
            sub.state = "unsubscribing"
            await self.send({"leave": room})
        else:
            del self._subs[room]
            await self._put(Unsubscribed(room, None, "unsubscribed"))

    async def publish(self, room: str, message: str) -> None:
        """Publish a chat message to ``room``; our own copy coming back is the receipt."""
        await self.send({"room": room, "message": message})

    async def send_direct(self, to: str, message: str) -> None:
        """Send a direct message to client ``to`` (it arrives in both personal streams)."""
        await self.send({"to": to, "message": message})

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one JSON frame as is; `NotConnected` if there is no connection."""
        ws = self._ws
        if ws is None or self._state is not ClientState.CONNECTED:
            raise NotConnected("not connected: the frame was not sent")
        try:
            await ws.send(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise NotConnected("the connection closed: the frame may not have been sent") from exc

    async def close(self) -> None:
        """Close for good (code 1000) and end iteration; positions stay readable."""
        self._closing = True
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._envelopes()

    async def _envelopes(self) -> AsyncIterator[Envelope]:
        async for item in self.events():
            if isinstance(item, Envelope):
                yield item

    async def events(self) -> AsyncIterator[Envelope | ClientEvent]:
        """Envelopes and events in the order they happened (one consumer at a time).

        Not reading holds the client's reader back (at most ``max_queue`` items wait), and
        the server's slow-consumer policy then applies: a 4008 close, and a resume.
        """
        try:
            async for item in self._receive:
                yield item
        except anyio.ClosedResourceError:  # the client's block exited under the consumer
            return
        if self._final is not None and not self._closing:
            raise self._final

    async def __aenter__(self) -> Client:
        self._send, self._receive = anyio.create_memory_object_stream[Envelope | ClientEvent](
            self._max_queue
        )
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
        assert self._task_group is not None
        try:
            await self._task_group.__aexit__(exc_type, exc, traceback)
        finally:
            self._task_group = None
            self._receive.close()

    # -- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                code, reason = await self._connect_once()
                if self._closing:
                    return
                retry = code not in self._no_retry and code >= 0
                if code < 0:  # a final HTTP refusal of the handshake: -status
                    code = 1006
                delay: float | None = None
                if retry:
                    if code == GAP_CLOSE_CODE and reason == "gap":
                        delay = 0.0
                    else:
                        delay = backoff_delay(
                            self._attempt, self._min_delay, self._max_delay, self._random
                        )
                    self._attempt += 1
                self._after_close()
                await self._put(Disconnected(code, reason, retry, delay))
                if not retry:
                    self._final = ClientClosed(code, reason)
                    return
                assert delay is not None
                await anyio.sleep(delay)  # the backoff itself, not a synchronisation
        finally:
            self._state = ClientState.DISCONNECTED
            self._ws = None
            self._send.close()

    async def _connect_once(self) -> tuple[int, str]:
        """One connection, from handshake to close: its close code and reason (``-status``
        for an HTTP refusal that is final)."""
        url = self._build_url()
        self._state = ClientState.CONNECTING
        await self._put(Connecting(self._attempt, url))
        heard = False
        try:
            async with _open_socket(url, self._open_timeout) as ws:
                self._ws = ws
                self._state = ClientState.CONNECTED
                await self._put(Connected(self.url))
                await self._on_open()
                try:
                    while True:
                        message = await ws.recv()
                        if not heard:
                            heard = True
                            self._attempt = 0
                        if isinstance(message, str):
                            await self._on_frame(message)
                except _Resume:
                    self._ws = None
                    await _close_socket(ws, GAP_CLOSE_CODE, "gap")
                    return GAP_CLOSE_CODE, "gap"
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                return exc.rcvd.code, exc.rcvd.reason
            return 1006, "connection lost"
        except InvalidStatus as exc:
            status = exc.response.status_code
            if 400 <= status < 500 and status not in _RETRY_STATUSES:
                return -status, f"handshake refused with HTTP {status}"
            return 1006, f"handshake refused with HTTP {status}"
        except InvalidURI as exc:
            return -400, str(exc)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return 1006, str(exc) or type(exc).__name__
        finally:
            self._ws = None
        return 1006, "connection lost"

    def _build_url(self) -> str:
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        first = next(
            (s for s in self._subs.values() if not s.personal and s.state != "unsubscribing"),
            None,
        )
        self._url_room = None if first is None else first.room
        if first is not None:
            query["room"] = first.room
            if first.seq is not None:
                query["since"] = str(first.seq)
                if first.epoch is not None:
                    query["epoch"] = first.epoch
        personal = None if self._personal is None else self._subs.get(self._personal)
        if personal is not None and personal.seq is not None:
            query["dm_since"] = str(personal.seq)
            if personal.epoch is not None:
                query["dm_epoch"] = personal.epoch
        if self._token is not None:
            query["token"] = self._token
        encoded = urlencode(query, quote_via=quote, safe="")
        return urlunsplit((parts.scheme, parts.netloc, parts.path, encoded, parts.fragment))

    async def _on_open(self) -> None:
        for sub in list(self._subs.values()):
            if sub.personal:
                continue
            if sub.room == self._url_room:
                sub.state = "subscribed"
                await self._put(Subscribed(sub.room, sub.seq, sub.epoch, sub.seq is not None, None))
            else:
                await self._join(sub)

    def _after_close(self) -> None:
        self._state = ClientState.DISCONNECTED
        for room, sub in list(self._subs.items()):
            if sub.state == "unsubscribing":
                del self._subs[room]  # the connection's end left it
            else:
                sub.state = "subscribing"

    async def _put(self, item: Envelope | ClientEvent) -> None:
        await self._send.send(item)

    # -- frames ----------------------------------------------------------------------------

    def _add(self, room: str, seq: int | None, epoch: str | None) -> _Sub:
        sub = _Sub(room, seq, epoch, personal=False)
        self._subs[room] = sub
        return sub

    def _personal_sub(self, room: str) -> _Sub:
        sub = self._subs.get(room)
        if sub is None:
            self._personal = room
            sub = self._subs[room] = _Sub(room, None, None, personal=True)
        return sub

    def _sub_for(self, room: Any) -> _Sub | None:
        if not isinstance(room, str):
            return None
        sub = self._subs.get(room)
        if sub is None and room.startswith("@") and self._personal in (None, room):
            sub = self._personal_sub(room)
        if sub is None or sub.state == "unsubscribing":
            return None
        return sub

    async def _join(self, sub: _Sub) -> None:
        frame: dict[str, Any] = {"join": sub.room}
        if sub.seq is not None:
            frame["since"] = sub.seq
            if sub.epoch is not None:
                frame["epoch"] = sub.epoch
        sub.state = "subscribing"
        sub.resuming = sub.seq is not None
        sub.lost = False
        await self.send(frame)

    async def _on_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return
        if "seq" in frame:
            try:
                envelope = Envelope.model_validate(frame)
            except ValidationError:
                return
            await self._on_envelope(envelope)
            return
        data = frame.get("data")
        data = data if isinstance(data, dict) else {}
        kind, room = frame["type"], frame.get("room")
        if kind == "joined":
            await self._on_joined(room, data)
        elif kind == "left":
            await self._on_left(room)
        elif kind == "history_lost":
            sub = self._sub_for(room)
            if sub is not None:
                await self._lost(sub, data)
        elif kind == "error":
            await self._on_error(room if isinstance(room, str) else None, data)

    async def _on_envelope(self, envelope: Envelope) -> None:
        sub = self._sub_for(envelope.room)
        if sub is None:
            return
        epoch = _epoch(envelope.epoch)
        if sub.epoch is not None and epoch != sub.epoch:
            # Another stream, and the server said nothing: its seqs cannot be compared.
            lost = {"since": sub.seq, "epoch": epoch, "first_seq": envelope.seq}
            await self._lost(sub, lost)
            sub.seq = None
        if sub.epoch is None:
            sub.epoch = epoch
        seq = envelope.seq
        if sub.seq is not None and seq <= sub.seq:
            return  # a duplicate
        if sub.seq is not None and not sub.accept_any and seq > sub.seq + 1:
            await self._put(Gap(sub.room, sub.seq + 1, seq))
            raise _Resume
        sub.seq = seq
        sub.accept_any = False
        await self._put(envelope)

    async def _lost(self, sub: _Sub, data: Mapping[str, Any]) -> None:
        sub.epoch = _epoch(data.get("epoch"))
        sub.seq = _int(data.get("last_seq"))
        sub.accept_any = True  # "accept the next envelope whatever its seq"
        sub.lost = True
        await self._put(
            HistoryLost(
                sub.room,
                _int(data.get("since")),
                sub.epoch,
                _int(data.get("first_seq")),
                _int(data.get("last_seq")),
            )
        )

    async def _on_joined(self, room: Any, data: Mapping[str, Any]) -> None:
        sub = self._sub_for(room)
        if sub is None:
            return
        epoch, seq = _epoch(data.get("epoch")), _int(data.get("seq"))
        same = epoch is not None and epoch == sub.epoch and sub.seq is not None
        if (
            same
            and seq is not None
            and not sub.accept_any
            and sub.seq is not None
            and sub.seq < seq
        ):
            # Up to date with `seq`, says the server, but the replay stopped short.
            await self._put(Gap(sub.room, sub.seq + 1, seq))
            raise _Resume
        if seq is not None and not (same and sub.seq is not None and sub.seq > seq):
            sub.seq, sub.epoch = seq, epoch
        sub.accept_any = False
        sub.state = "subscribed"
        recovered = sub.resuming and not sub.lost
        await self._put(Subscribed(sub.room, sub.seq, sub.epoch, sub.resuming, recovered))

    async def _on_left(self, room: Any) -> None:
        sub = self._subs.get(room) if isinstance(room, str) else None
        if sub is None or sub.state != "unsubscribing":
            return
        del self._subs[sub.room]
        await self._put(Unsubscribed(sub.room, None, "unsubscribed"))

    async def _on_error(self, room: str | None, data: Mapping[str, Any]) -> None:
        code, detail = _text(data.get("code")) or "unknown", _text(data.get("detail"))
        await self._put(ServerError(room, code, detail))
        if code == "rate_limited":
            # The server dropped a frame and names the connection's first room, not the
            # frame's: if it was a join, that join is never answered. Send every unanswered
            # join again, with backoff (frames are handled in order: one that was only slow
            # is answered first, and the second then gets already_joined, which changes
            # nothing).
            for pending in list(self._subs.values()):
                if not pending.personal and pending.state == "subscribing":
                    self._retry_join(pending)
            return
        sub = None if room is None else self._subs.get(room)
        if sub is None or sub.personal or sub.state != "subscribing":
            return
        if code == "already_joined":
            sub.state = "subscribed"
            await self._put(Subscribed(sub.room, sub.seq, sub.epoch, False, None))
        elif code in _JOIN_REFUSALS:
            del self._subs[sub.room]
            await self._put(Unsubscribed(sub.room, code, detail))
        elif code == "unavailable":
            # The backend could not serve the join: try again on this connection, with backoff.
            self._retry_join(sub)

    def _retry_join(self, sub: _Sub) -> None:
        """Send ``sub``'s join again after a backoff, if still on this connection and
        unanswered (one retry at a time per room)."""
        if sub.retrying or self._task_group is None:
            return
        sub.retrying = True
        self._task_group.start_soon(self._join_later, sub, self._ws)

    async def _join_later(self, sub: _Sub, ws: Any) -> None:
        try:
            # The backoff itself, not a synchronisation.
            await anyio.sleep(backoff_delay(1, self._min_delay, self._max_delay, self._random))
        finally:
            sub.retrying = False
        if self._ws is ws and self._subs.get(sub.room) is sub and sub.state == "subscribing":
            with contextlib.suppress(NotConnected):
                await self._join(sub)


def connect(
    url: str,
    *,
    token: str | None = None,
    rooms: Iterable[str] | Mapping[str, Position] = (),
    min_reconnect_delay: float = 0.5,
    max_reconnect_delay: float = 20.0,
    open_timeout: float = 10.0,
    max_queue: int = 1024,
    no_retry_codes: Iterable[int] = NO_RETRY_CODES,
    random: Callable[[], float] = random_module.random,
) -> Client:
    """A `Client` of ``url`` (e.g. ``ws://host/ws/alice``), to use with ``async with``.

    ``rooms`` are subscribed from the first connection on (a mapping gives each a
    `Position` to resume from); the first one is the connection's URL room. ``token``
    is sent as ``token=``. Reconnects back off with full jitter between
    ``min_reconnect_delay`` and ``max_reconnect_delay`` seconds; ``random`` is the jitter's
    source. ``max_queue`` bounds the envelopes and events waiting for the consumer.
    """
    return Client(
        url,
        token=token,
        rooms=rooms,
        min_reconnect_delay=min_reconnect_delay,
        max_reconnect_delay=max_reconnect_delay,
        open_timeout=open_timeout,
        max_queue=max_queue,
        no_retry_codes=no_retry_codes,
        random=random,
    )
