"""What the comparison servers share: the chat message they broadcast and how they are run."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import uvicorn
from starlette.types import ASGIApp


def chat_envelope(room: str, client_id: str, message: str) -> dict[str, object]:
    """The chat app's envelope without ``seq`` and ``id``, for the client's ``message``.

    The server adds the time and the sender, as the original design does.
    """
    return {
        "type": "message",
        "room": room,
        "client_id": client_id,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "data": {"message": message},
    }


def chat_message(room: str, client_id: str, text: str) -> str:
    """The JSON text the comparison servers broadcast for one client frame ``text``."""
    return json.dumps(chat_envelope(room, client_id, json.loads(text)["message"]))


def parse_address(prog: str) -> argparse.Namespace:
    """``--host`` and ``--port``, the only flags the harness passes to these servers."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args()


def run_uvicorn(app: ASGIApp, prog: str) -> None:
    """Serve ``app`` with the chat app's uvicorn settings, so the comparison is of the apps."""
    args = parse_address(prog)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", ws_per_message_deflate=False
    )
