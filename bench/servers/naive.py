"""The baseline: a seed-faithful naive broadcast app (Starlette on uvicorn).

It is the pattern of FastAPI's documented ``ConnectionManager``: a list of sockets, and
``broadcast`` awaits ``send_text`` on each socket in turn. So one slow client stalls every
broadcast to its room (head-of-line blocking) and a dead one aborts the broadcast for the
rest. Rooms are the simplest extension of that pattern: a dict from room name to such a list,
and a broadcast goes through the sender's room's list with the same sequential awaits. No
sequence numbers, no queue. It is kept deliberately as it is: do not "fix" it.

Run: ``python -m bench.servers.naive --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .common import chat_message, run_uvicorn


class ConnectionManager:
    """A list of sockets per room; nothing else."""

    def __init__(self) -> None:
        self.rooms: dict[str, list[WebSocket]] = {}

    async def connect(self, websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        self.rooms.setdefault(room, []).append(websocket)

    def disconnect(self, websocket: WebSocket, room: str) -> None:
        connections = self.rooms[room]
        connections.remove(websocket)
        if not connections:
            del self.rooms[room]

    async def broadcast(self, room: str, message: str) -> None:
        for connection in self.rooms.get(room, []):
            await connection.send_text(message)


manager = ConnectionManager()


async def chat_socket(websocket: WebSocket) -> None:
    client_id: str = websocket.path_params["client_id"]
    room = websocket.query_params.get("room", "lobby")
    await manager.connect(websocket, room)
    try:
        while True:
            text = await websocket.receive_text()
            await manager.broadcast(room, chat_message(room, client_id, text))
    except WebSocketDisconnect:
        manager.disconnect(websocket, room)


app = Starlette(routes=[WebSocketRoute("/ws/{client_id}", chat_socket)])


def main() -> None:
    run_uvicorn(app, "python -m bench.servers.naive")


if __name__ == "__main__":
    main()
