"""Run the chat app: ``python -m examples.chat_app --host 127.0.0.1 --port 8000``.

``--server uvicorn`` (the default) serves the Starlette app, with wsbroadcast's uvicorn
WebSocket protocol (``--ws wsbroadcast``) so that it takes the fast path; ``--server
websockets`` serves the same routes and protocol on the ``websockets`` library's server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Callable, Sequence

import uvicorn

from wsbroadcast import DEFAULT_QUEUE_SIZE, backend_from_url
from wsbroadcast.transports.uvicorn import WebSocketProtocol

from .app import Settings, create_app
from .service import ChatService

__all__ = ["main", "parse_args"]

_UVICORN_WS = ("wsbroadcast", "websockets-sansio")
"""``--ws``: uvicorn's protocol, the same but for the ``wsbroadcast.frames`` ASGI extension
that wsbroadcast's adds."""


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


class _ClientMistakeFilter(logging.Filter):
    """Log a client's invalid UTF-8 text frame as one INFO line, not an ERROR with traceback.

    uvicorn's websockets-sansio protocol closes such a connection with 1007 (as RFC 6455
    requires) but logs the ``UnicodeDecodeError`` with its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip the traceback from uvicorn's invalid UTF-8 message; keep everything."""
        if record.msg == "Invalid UTF-8 sequence received from client.":
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = "INFO"
            record.msg = "Invalid UTF-8 in a text frame from a client: closed with 1007."
        return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.chat_app",
        description="The wsbroadcast reference chat app (Starlette + uvicorn, or websockets).",
    )
    parser.add_argument(
        "--server",
        choices=["uvicorn", "websockets"],
        default="uvicorn",
        help="uvicorn: the Starlette app; websockets: the websockets library's server, which"
        " writes each broadcast frame once for all clients (default %(default)s)",
    )
    parser.add_argument(
        "--ws",
        choices=_UVICORN_WS,
        default="wsbroadcast",
        help="uvicorn's WebSocket protocol: wsbroadcast's, which lets the app write each"
        " broadcast frame once for all clients, or uvicorn's own websockets-sansio, plain"
        " ASGI (default %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    parser.add_argument("--backend", default="memory://", help="backend URL (default %(default)s)")
    parser.add_argument(
        "--rate-limit",
        type=_non_negative,
        default=20,
        metavar="N",
        help="messages per second per connection, bursts of 2N; 0 turns it off (default 20)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=65536,
        metavar="N",
        help="largest frame a client may send; larger closes with 1009 (default 65536)",
    )
    parser.add_argument(
        "--max-text",
        type=_positive_int,
        default=4000,
        metavar="N",
        help="most characters in a chat message (default 4000)",
    )
    parser.add_argument(
        "--queue-size",
        type=_positive_int,
        default=DEFAULT_QUEUE_SIZE,
        metavar="N",
        help="frames a connection may have waiting before it is closed as a slow consumer"
        f" (default {DEFAULT_QUEUE_SIZE})",
    )
    parser.add_argument(
        "--history",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="envelopes kept per room for resume (default: the backend's, 1000 for memory://)",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        dest="allowed_origins",
        help="an origin besides the server's own that may connect (repeatable),"
        " e.g. https://chat.example.com",
    )
    parser.add_argument(
        "--send-buffer",
        type=_positive_int,
        default=None,
        metavar="BYTES",
        help="SO_SNDBUF of client sockets, bounding the kernel memory a client that stops"
        " reading can hold (default: the OS's autotuning)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default info)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Build the app from the command line and serve it with uvicorn or websockets."""
    args = parse_args(argv)
    try:
        settings = Settings(
            backend=args.backend,
            rate_limit=args.rate_limit,
            max_message_bytes=args.max_message_bytes,
            max_text=args.max_text,
            queue_size=args.queue_size,
            history=args.history,
            allowed_origins=tuple(args.allowed_origins),
        )
        backend_from_url(settings.backend_url())  # fail now, not at startup, on a bad URL
    except ValueError as exc:  # InvalidBackendURL is a ValueError too
        sys.exit(f"python -m examples.chat_app: error: {exc}")
    if args.server == "websockets":
        _run_websockets(args, settings)
    else:
        _run_uvicorn(args, settings)


def _run_websockets(args: argparse.Namespace, settings: Settings) -> None:
    from .websockets_server import run

    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )
    main = run(ChatService(settings), args.host, args.port, args.send_buffer)
    try:
        # uvloop when it is installed (uvicorn[standard] brings it), as uvicorn does.
        try:
            import uvloop
        except ImportError:
            asyncio.run(main)
        else:
            uvloop.run(main)
    except OSError as exc:  # the address is in use, say
        logging.getLogger("examples.chat_app").error("cannot serve: %s", exc)
        sys.exit(3)


def _run_uvicorn(args: argparse.Namespace, settings: Settings) -> None:
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="on",
        ws=WebSocketProtocol if args.ws == "wsbroadcast" else args.ws,
        # The server refuses oversized frames itself (close 1009) before buffering them.
        ws_max_size=settings.max_message_bytes,
        # Frames are encoded once and shared by every recipient; compression would redo it
        # per connection (and make ws_max_size apply after decompression).
        ws_per_message_deflate=False,
    )
    logging.getLogger("uvicorn.error").addFilter(_ClientMistakeFilter())
    server = uvicorn.Server(config)
    if args.send_buffer is None:
        server.run()
    else:
        listener = config.bind_socket()
        # Accepted sockets inherit it: it caps the kernel memory a client that stops reading
        # can hold (Linux autotunes it up to net.ipv4.tcp_wmem, 4 MiB by default).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.send_buffer)
        server.run(sockets=[listener])
    if not server.started:
        sys.exit(3)


if __name__ == "__main__":
    main()
