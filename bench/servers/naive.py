"""The baseline: a seed-faithful naive broadcast app (Starlette on uvicorn).

It is the pattern of FastAPI's documented ``ConnectionManager``: one list of sockets, and
``broadcast`` awaits ``send_text`` on each socket in turn. So one slow client stalls everyone
(head-of-line blocking) and a dead one aborts the broadcast for the rest. It has no rooms, no
sequence numbers and no queue. It is kept deliberately as it is: do not "fix" it.

Run: ``python -m bench.servers.naive --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import chat_message, run_uvicorn


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
            text = await websocket.receive_text()
            await manager.broadcast(chat_message(room, client_id, text))
    except WebSocketDisconnect:
        manager.disconnect(websocket)


app = Starlette(routes=[WebSocketRoute("/ws/{client_id}", chat_socket)])


def main() -> None:
    run_uvicorn(app, "python -m bench.servers.naive")


if __name__ == "__main__":
    main()
