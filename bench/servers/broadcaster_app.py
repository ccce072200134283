"""encode/broadcaster (memory backend) behind a Starlette app on uvicorn, in the chat protocol.

The pattern of broadcaster's own README: per connection, one task reads the client's frames
and publishes them to the channel; the other subscribes to the channel (an unbounded
``asyncio.Queue`` per subscriber) and awaits ``send_text`` for each event.

Run: ``python -m bench.servers.broadcaster_app --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import anyio
import uvicorn
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

broadcast = Broadcast("memory://")


async def receive_and_publish(websocket: WebSocket, room: str, client_id: str) -> None:
    async for text in websocket.iter_text():
        data = json.loads(text)
        message = {
            "type": "message",
            "room": room,
            "client_id": client_id,
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "data": {"message": data["message"]},
        }
        await broadcast.publish(channel=room, message=json.dumps(message))


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
    parser = argparse.ArgumentParser(prog="python -m bench.servers.broadcaster_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", ws_per_message_deflate=False
    )


if __name__ == "__main__":
    main()
