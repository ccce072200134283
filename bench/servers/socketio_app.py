"""python-socketio's ``AsyncServer`` (ASGI mode) on uvicorn, in the chat protocol's semantics.

Socket.IO as its documentation shows it: the ``connect`` handler puts the client in the room
named in its query string (``?room=NAME&client_id=ID``) with ``enter_room`` and keeps both in
the user session; a ``message`` event (``{"message": "..."}``) is emitted to everyone in the
room, sender included, as a ``chat_message`` event whose data is the chat envelope (a dict;
python-socketio encodes it once per emit and queues it on each recipient's Engine.IO socket,
an unbounded queue drained by one writer task per connection). Every other setting is the
library's default (ping every 25 s, handlers run as tasks); HTTP compression, which only
applies to long-polling, is off, and uvicorn runs with permessage-deflate off as for the
other servers. Clients speak Engine.IO v4 / Socket.IO v5 (``bench/protocols.py``).

Run: ``python -m bench.servers.socketio_app --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import socketio

from .common import chat_envelope, run_uvicorn

sio = socketio.AsyncServer(async_mode="asgi", http_compression=False)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
    query = parse_qs(environ.get("QUERY_STRING", ""))
    room = query.get("room", ["lobby"])[0]
    client_id = query.get("client_id", [sid])[0]
    await sio.save_session(sid, {"room": room, "client_id": client_id})
    await sio.enter_room(sid, room)


@sio.event
async def message(sid: str, data: dict[str, Any]) -> None:
    session = await sio.get_session(sid)
    room = session["room"]
    await sio.emit(
        "chat_message", chat_envelope(room, session["client_id"], data["message"]), room=room
    )


app = socketio.ASGIApp(sio)


def main() -> None:
    run_uvicorn(app, "python -m bench.servers.socketio_app")


if __name__ == "__main__":
    main()
