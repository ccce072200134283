"""wsbroadcast in a FastAPI app: auth as a dependency, a check of who may join which room, a
WebSocket per room, an HTTP route that publishes, and direct notifications to one user.

Run it with ``uvicorn examples.fastapi_app.app:app --ws
wsbroadcast.transports.uvicorn:WebSocketProtocol --ws-per-message-deflate false`` (or plain
``uvicorn``: the same app, with ASGI sends). ``WSBROADCAST_BACKEND=redis://...`` serves one
chat from many processes. Tokens here are a demo (``TOKENS``, ``token -> user``); a real app
verifies its own (a JWT, a session) in `user_from_token`, and nothing else changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, WebSocket, status
from fastapi import WebSocketException as FastAPIWebSocketException
from pydantic import BaseModel, Field

from wsbroadcast import ConnectionManager, InvalidInput, is_user_room, is_valid_name, user_room
from wsbroadcast.transports.starlette import starlette_transport

TOKENS = {"alice-token": "alice", "bob-token": "bob", "ops-token": "ops"}
"""Demo credentials: bearer token -> user id."""

manager = ConnectionManager(os.environ.get("WSBROADCAST_BACKEND", "memory://"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with manager:  # closes every socket with 1001 on shutdown
        yield


app = FastAPI(title="wsbroadcast on FastAPI", lifespan=lifespan)


def user_from_token(token: str | None) -> str | None:
    """The user a token speaks for, or None: the one place that knows about credentials."""
    return TOKENS.get(token or "")


def http_user(authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller of an HTTP route, from ``Authorization: Bearer TOKEN`` (401 otherwise)."""
    scheme, _, token = (authorization or "").partition(" ")
    user = user_from_token(token) if scheme.lower() == "bearer" else None
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return user


def ws_user(token: Annotated[str | None, Query()] = None) -> str:
    """The client of a WebSocket, from ``?token=``; refused before accept (HTTP 403)."""
    user = user_from_token(token)
    if user is None:
        raise FastAPIWebSocketException(status.WS_1008_POLICY_VIOLATION, "bad token")
    return user


def may_join(user: str, room: str) -> bool:
    """Whether ``user`` may follow ``room``: the one place that authorises rooms. Personal
    streams (``@<user>``) are the library's to guard; here ``ops:*`` rooms are staff only."""
    return (
        is_valid_name(room)
        and not is_user_room(room)
        and (not room.startswith("ops:") or user == "ops")
    )


def room_name(room: str) -> str:
    """A path's room, checked against the library's name grammar."""
    if not is_valid_name(room):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "bad room name")
    return room


class Message(BaseModel):
    message: str = Field(min_length=1, max_length=2000)


async def follow(
    websocket: WebSocket, user: str, room: str, since: int | None, epoch: str | None
) -> None:
    """Deliver ``room`` to ``websocket`` (resuming after ``since``/``epoch``) and publish
    what the client sends, until either side leaves."""
    transport = starlette_transport(websocket)
    async with manager.session(transport, user, room, since, epoch) as connection:
        async for text in websocket.iter_text():
            try:
                message = Message.model_validate_json(text).message
                await manager.broadcast(room, {"message": message}, user)
            except (ValueError, InvalidInput):  # pydantic's and ours: answered, not fatal
                connection.send_error("invalid_message", 'send {"message": "..."}')


@app.websocket("/ws/rooms/{room}")
async def room_socket(
    websocket: WebSocket,
    room: str,
    user: Annotated[str, Depends(ws_user)],
    since: int | None = None,
    epoch: str | None = None,
) -> None:
    if not may_join(user, room):  # before accept: the client sees HTTP 403
        raise FastAPIWebSocketException(status.WS_1008_POLICY_VIOLATION, "room not allowed")
    await follow(websocket, user, room, since, epoch)


@app.websocket("/ws/me")
async def my_notifications(
    websocket: WebSocket, user: Annotated[str, Depends(ws_user)], since: int | None = None
) -> None:
    """The user's personal stream (``@<id>``): every tab, on every node, resumable."""
    await follow(websocket, user, user_room(user), since, websocket.query_params.get("epoch"))


@app.post("/rooms/{room}/messages", status_code=status.HTTP_202_ACCEPTED)
async def post_message(
    room: Annotated[str, Depends(room_name)],
    body: Message,
    user: Annotated[str, Depends(http_user)],
) -> Any:
    """Publish to a room over HTTP, as the authenticated user."""
    envelope = await manager.broadcast(room, {"message": body.message}, user)
    return json.loads(envelope.text)


@app.post("/users/{user_id}/notify", status_code=status.HTTP_202_ACCEPTED)
async def notify(user_id: str, body: Message, _: Annotated[str, Depends(http_user)]) -> Any:
    """Notify one user on every open tab, as the server (``client_id`` null); kept for the
    user's next resume if no tab is open."""
    if not is_valid_name(user_id):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "bad user id")
    envelope = await manager.send_direct(user_id, {"notice": body.message})
    return json.loads(envelope.text)
