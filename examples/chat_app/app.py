"""The chat app on Starlette (served by uvicorn): a thin front end over `ChatService`.

The routes and the WebSocket protocol live in `examples.chat_app.service` (their checks in
`examples.chat_app.edge`); this module maps Starlette's requests and ``WebSocket`` onto them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from wsbroadcast import CloseCode
from wsbroadcast.transports.starlette import starlette_transport
from wsbroadcast.transports.uvicorn import WebSocketProtocol

from .responses import CLIENT_JS_PATH, client_script
from .service import (
    CLOSE_WAIT,
    ChatRequest,
    ChatService,
    ClientError,
    ErrorCode,
    FrameTooBig,
    Handshake,
    HttpResponse,
    RateLimiter,
    Refusal,
    Settings,
    origin_allowed,
    parse_client_frame,
    valid_name,
)

__all__ = [
    "ClientError",
    "ErrorCode",
    "RateLimiter",
    "Settings",
    "app",
    "create_app",
    "origin_allowed",
    "parse_client_frame",
    "valid_name",
]


class _StarletteSocket:
    """A Starlette ``WebSocket`` as a `ChatSocket`."""

    gone: tuple[type[Exception], ...] = (OSError, WebSocketDisconnect)

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        # The fast path when served by wsbroadcast's uvicorn protocol (python -m
        # examples.chat_app does); plain ASGI sends on any other server.
        self.transport = starlette_transport(websocket, close_timeout=CLOSE_WAIT)

    async def receive(self) -> str | bytes | None:
        """The next text or binary frame, or None once the client has left.

        Raises `FrameTooBig` for a disconnect with 1009: uvicorn refused a frame over
        ``ws_max_size`` and closed the connection itself.
        """
        message: Any = await self.websocket.receive()
        if message["type"] != "websocket.receive":  # websocket.disconnect
            if message.get("code") == CloseCode.MESSAGE_TOO_BIG:
                raise FrameTooBig
            return None
        text: str | None = message.get("text")
        return text if text is not None else bytes(message.get("bytes") or b"")


def _response(response: HttpResponse) -> Response:
    return Response(
        response.body,
        status_code=response.status,
        headers=dict(response.headers),
        media_type=response.content_type,
    )


class _StarletteFrontEnd:
    """Starlette's endpoints, each a call into the shared `ChatService`."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.client_js = client_script()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Run the service's manager for as long as the app serves."""
        async with self.service.running():
            yield

    async def index(self, request: Request) -> Response:
        """``GET /``."""
        return _response(self.service.index())

    async def client_script(self, request: Request) -> Response:
        """``GET /wsbroadcast-client.js``: the JavaScript client that chat.html imports."""
        return _response(self.client_js)

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``."""
        return _response(self.service.healthz())

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``."""
        return _response(self.service.metrics())

    async def room(self, request: Request) -> Response:
        """``GET /rooms/{room}``."""
        return _response(await self.service.room(request.path_params["room"]))

    async def publish(self, request: Request) -> Response:
        """``POST /api/rooms/{room}/messages``."""
        body = await request.body()
        response = await self.service.publish(
            request.path_params["room"],
            request.headers.get("authorization"),
            request.headers.get("content-type"),
            body,
        )
        return _response(response)

    async def chat_socket(self, websocket: WebSocket) -> None:
        """``WS /ws/{client_id}?room=NAME&since=SEQ&epoch=E``."""
        request = self._check_handshake(websocket)
        if isinstance(request, Refusal):
            if request.status != HTTPStatus.FORBIDDEN and _can_deny(websocket):
                response = PlainTextResponse(f"{request.detail}\n", status_code=request.status)
                await websocket.send_denial_response(response)
                return
            # A close before accept is an HTTP 403 on uvicorn.
            await websocket.close(code=CloseCode.POLICY_VIOLATION, reason=request.reason)
            return
        await self.service.serve(request, _StarletteSocket(websocket))

    def _check_handshake(self, websocket: WebSocket) -> ChatRequest | Refusal:
        """The handshake's checks, read through a view of the scope that ends here:
        Starlette caches what it parses (URL, query, headers) on the object that parsed it,
        and ``websocket`` lives as long as the connection (about 650 bytes)."""
        view = HTTPConnection(websocket.scope)
        return self.service.check_handshake(
            Handshake(
                path=view.url.path,
                client_id=view.path_params["client_id"],
                query=view.query_params,
                origin=view.headers.get("origin"),
                host=view.headers.get("host"),
                secure=view.url.scheme == "wss",
                client_ip=view.client.host if view.client else None,
            )
        )


def _can_deny(websocket: WebSocket) -> bool:
    """Whether the server can answer a handshake with any HTTP response (uvicorn can)."""
    extensions: Any = websocket.scope.get("extensions") or {}
    return "websocket.http.response" in extensions


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the chat app; its ``lifespan`` runs the connection manager."""
    service = ChatService(settings or Settings())
    # Closes for a full write buffer happen in wsbroadcast's uvicorn protocol, which counts
    # them for the process; on any other server there are none.
    service.write_buffer_overflows = lambda: WebSocketProtocol.slow_consumers
    front = _StarletteFrontEnd(service)
    app = Starlette(
        routes=[
            Route("/", front.index, methods=["GET"]),
            Route(CLIENT_JS_PATH, front.client_script, methods=["GET"]),
            Route("/healthz", front.healthz, methods=["GET"]),
            Route("/metrics", front.metrics, methods=["GET"]),
            Route("/rooms/{room}", front.room, methods=["GET"]),
            Route("/api/rooms/{room}/messages", front.publish, methods=["POST"]),
            WebSocketRoute("/ws/{client_id}", front.chat_socket),
        ],
        lifespan=front.lifespan,
    )
    app.state.chat = service
    return app


app = create_app(Settings())
"""The app with default settings, for ``uvicorn examples.chat_app.app:app``."""
