"""The ``websockets`` library's asyncio server with its ``broadcast()``, in the chat protocol.

``broadcast()`` writes the frame to every open connection of the sender's room (a set of
connections per room) without awaiting (no backpressure: a client that stops reading grows its
write buffer). Uses uvloop when it is installed, as uvicorn does for the other servers.

Run: ``python -m bench.servers.ws_broadcast --host 127.0.0.1 --port 8000``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from .common import chat_message, parse_address

ROOMS: dict[str, set[ServerConnection]] = {}


async def handler(websocket: ServerConnection) -> None:
    url = urlsplit(websocket.request.path if websocket.request else "/")
    client_id = url.path.rsplit("/", 1)[-1]
    room = parse_qs(url.query).get("room", ["lobby"])[0]
    connections = ROOMS.setdefault(room, set())
    connections.add(websocket)
    try:
        async for text in websocket:
            broadcast(connections, chat_message(room, client_id, str(text)))
    except ConnectionClosed:
        pass
    finally:
        connections.discard(websocket)
        if not connections and ROOMS.get(room) is connections:
            del ROOMS[room]


async def serve_until_signal(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, host, port, compression=None, max_size=65536, ping_interval=None):
        await stop


def main() -> None:
    args = parse_address("python -m bench.servers.ws_broadcast")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_until_signal(args.host, args.port))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve_until_signal(args.host, args.port))


if __name__ == "__main__":
    main()
