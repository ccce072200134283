"""encode/broadcaster (memory backend) behind a Starlette app on uvicorn, in the chat protocol.

The pattern of broadcaster's own README: per connection, one task reads the client's frames
and publishes them to the channel; the other subscribes to the channel (an unbounded
``asyncio.Queue`` per subscriber) and awaits ``send_text`` for each event.

Run: ``python -m bench.servers.broadcaster_app --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import chat_message, run_uvicorn

broadcast = Broadcast("memory://")


async def receive_and_publish(websocket: WebSocket, room: str, client_id: str) -> None:
    async for text in websocket.iter_text():
        await broadcast.publish(channel=room, message=chat_message(room, client_id, text))


async def subscribe_and_send(websocket: WebSocket, room: str) -> None:
    async with broadcast.subscribe(channel=room) as subscriber:
        async for event in subscriber:
            await websocket.send_text(event.message)


async def chat_socket(websocket: WebSocket) -> None:
    client_id: str = websocket.path_params["client_id"]
    room = websocket.query_params.get("room", "lobby")
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        async with anyio.create_task_group() as task_group:

            async def receiver() -> None:
                await receive_and_publish(websocket, room, client_id)
                task_group.cancel_scope.cancel()

            task_group.start_soon(receiver)
            await subscribe_and_send(websocket, room)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = Starlette(routes=[WebSocketRoute("/ws/{client_id}", chat_socket)], lifespan=lifespan)


def main() -> None:
    run_uvicorn(app, "python -m bench.servers.broadcaster_app")


if __name__ == "__main__":
    main()
