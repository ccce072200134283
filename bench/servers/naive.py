"""The baseline: a seed-faithful naive broadcast app (Starlette on uvicorn).

It is the pattern of FastAPI's documented ``ConnectionManager``: one list of sockets, and
``broadcast`` awaits ``send_text`` on each socket in turn. So one slow client stalls everyone
(head-of-line blocking) and a dead one aborts the broadcast for the rest. It has no rooms, no
sequence numbers and no queue. It is kept deliberately as it is: do not "fix" it.

Run: ``python -m bench.servers.naive --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


class ConnectionManager:
    """A list of sockets; nothing else."""

    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        self.active_connections.remove(websocket)

    async def broadcast(self, message: str) -> None:
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()


async def chat_socket(websocket: WebSocket) -> None:
    client_id: str = websocket.path_params["client_id"]
    room = websocket.query_params.get("room", "lobby")
    await manager.connect(websocket)
    try:
        while True:
            data = json.loads(await websocket.receive_text())
            message = {
                "type": "message",
                "room": room,
                "client_id": client_id,
                "timestamp": datetime.now(timezone.utc).isoformat(),
                "data": {"message": data["message"]},
            }
            await manager.broadcast(json.dumps(message))
    except WebSocketDisconnect:
        manager.disconnect(websocket)


app = Starlette(routes=[WebSocketRoute("/ws/{client_id}", chat_socket)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers.naive")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    # The same uvicorn settings as the chat app's, so the comparison is of the apps.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", ws_per_message_deflate=False
    )


if __name__ == "__main__":
    main()
