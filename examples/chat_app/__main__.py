"""Run the chat app: ``python -m examples.chat_app --host 127.0.0.1 --port 8000``.

``--server uvicorn`` (the default) serves the Starlette app, with wsbroadcast's uvicorn
WebSocket protocol (``--ws wsbroadcast``) so that it takes the fast path, and wsbroadcast's
httptools HTTP protocol, which puts a deadline and size limits on request heads; ``--server
websockets`` serves the same routes and protocol on the ``websockets`` library's server.

Either way the log goes to stderr, one line per record with its level and logger name, and
SIGINT (Ctrl-C) or SIGTERM shuts the server down gracefully, in at most
``--shutdown-timeout`` seconds, and exits 0.

``--workers N`` serves one port from N processes, for all the cores of a machine: each
worker binds the port with ``SO_REUSEPORT`` (the kernel spreads new connections over them)
and they share rooms through the backend, which must therefore be one they can all reach
(Redis); with ``memory://`` every worker would have rooms of its own, so it is refused. The
first process supervises: it forwards SIGINT and SIGTERM, and exits once every worker has.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.config
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn

from wsbroadcast import DEFAULT_QUEUE_SIZE, backend_from_url
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol

from .app import Settings, create_app
from .service import CLOSE_WAIT, ChatService

__all__ = ["main", "parse_args"]

_UVICORN_WS = ("wsbroadcast", "websockets-sansio")
"""``--ws``: wsbroadcast's uvicorn protocol with or without the ``wsbroadcast.frames`` ASGI
extension (``websockets-sansio``: plain ASGI sends, as on uvicorn's own protocol, with the
same protections at the edge)."""


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


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""Every line of the log, on both servers: when, how bad, and which logger said it."""


def logging_config(level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of both servers: one stderr handler on the root
    logger, so uvicorn's, the app's (``examples.chat_app``) and the library's
    (``wsbroadcast...``) records all get `LOG_FORMAT`."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "level": level.upper(), "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


class _Server(uvicorn.Server):
    """uvicorn's server, exiting normally after a graceful shutdown on SIGINT or SIGTERM.

    uvicorn re-raises the signal it caught once it has shut down, so Ctrl-C ends in a
    ``KeyboardInterrupt`` traceback and SIGTERM in death by signal; the chat app shut down
    cleanly by then, so it exits 0, as on the websockets server.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, forgetting the signals caught before it would raise them again."""
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list):
                    captured.clear()


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
        " broadcast frame once for all clients, or websockets-sansio, plain ASGI sends as"
        " on uvicorn's own (both with wsbroadcast's bounds at the edge; default %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    parser.add_argument("--backend", default="memory://", help="backend URL (default %(default)s)")
    parser.add_argument(
        "--rate-limit",
        type=_non_negative,
        default=20,
        metavar="N",
        help="messages per second per client id, across its tabs (and nodes, on Redis), bursts"
        " of 2N; 0 turns it off, and the per-IP limit unless --ip-rate-limit is given"
        " (default 20)",
    )
    parser.add_argument(
        "--ip-rate-limit",
        type=_non_negative,
        default=None,
        metavar="N",
        help="messages per second per IP address, across its client ids, bursts of 2N; 0 turns"
        " it off (default: five times --rate-limit)",
    )
    parser.add_argument(
        "--max-connections-per-ip",
        type=_non_negative_int,
        default=256,
        metavar="N",
        help="WebSocket connections one IP address may have open on this process; more are"
        " refused with HTTP 429; 0: no cap (default 256)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="time a client has to send its request line and headers (default 10)",
    )
    parser.add_argument(
        "--max-write-buffer",
        type=_positive_int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="bytes waiting in a connection's socket write buffer (pongs included) before it"
        " is closed with 4008 as a slow consumer (default 4194304)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_positive_int,
        default=10,
        metavar="SECONDS",
        help="on SIGINT or SIGTERM, how long to wait for connections to close before cutting"
        " them (default 10)",
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
        "--max-rooms",
        type=_positive_int,
        default=32,
        metavar="N",
        help="rooms one connection may be in at once, its personal stream (direct messages)"
        " not counted; a join past it gets the error too_many_rooms (default 32)",
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
        "--slow-consumer",
        choices=["disconnect", "drop_oldest"],
        default="disconnect",
        help="what a full queue does: close the connection with 4008 (disconnect, the"
        " default) or drop its oldest envelopes, which the client sees as a seq gap and"
        " resumes (drop_oldest)",
    )
    parser.add_argument(
        "--history",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="envelopes kept per room for resume (default: the backend's, 1000 for memory://)",
    )
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("CHAT_JWT_SECRET"),
        metavar="SECRET",
        help="require ?token=, an HS256 JWT signed with SECRET (32+ characters) whose sub is"
        " the client id, with exp and optionally rooms (names, * wildcards); bad or expired"
        " tokens get HTTP 403 (default: $CHAT_JWT_SECRET, else no token needed)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        dest="api_keys",
        help="a key for POST /api/rooms/{room}/messages with 'Authorization: Bearer KEY'"
        " (repeatable; at least 16 characters); without one the route is off (uvicorn only:"
        " the websockets server reads no request body)",
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
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="processes serving the port, each with SO_REUSEPORT; more than 1 needs a"
        " backend they share (redis://, redis+cluster://) (default 1)",
    )
    parser.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each full garbage collection, freeze its survivors, so that the next"
        " one's pause does not grow with the number of connections; --no-gc-freeze only"
        " measures the pauses (both report them in /metrics) (default: freeze)",
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
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
            ip_rate_limit=args.ip_rate_limit,
            max_connections_per_ip=args.max_connections_per_ip,
            handshake_timeout=args.handshake_timeout,
            max_write_buffer=args.max_write_buffer,
            shutdown_timeout=args.shutdown_timeout,
            max_message_bytes=args.max_message_bytes,
            max_text=args.max_text,
            max_rooms=args.max_rooms,
            gc_freeze=args.gc_freeze,
            queue_size=args.queue_size,
            slow_consumer=args.slow_consumer,
            history=args.history,
            allowed_origins=tuple(args.allowed_origins),
            api_keys=tuple(args.api_keys),
            jwt_secret=args.jwt_secret,
        )
        backend_from_url(settings.backend_url())  # fail now, not at startup, on a bad URL
        if args.workers > 1 and settings.backend_url().startswith("memory:"):
            raise ValueError(
                f"--workers {args.workers} needs a backend the workers share (redis:// or"
                " redis+cluster://): on memory:// each worker would have rooms of its own"
            )
    except ValueError as exc:  # InvalidBackendURL is a ValueError too
        sys.exit(f"python -m examples.chat_app: error: {exc}")
    if args.workers > 1:
        raw = list(sys.argv[1:] if argv is None else argv)
        sys.exit(_supervise(args.workers, [*raw, "--workers", "1", "--reuse-port"]))
    if args.server == "websockets":
        _run_websockets(args, settings)
    else:
        _run_uvicorn(args, settings)


def _run_websockets(args: argparse.Namespace, settings: Settings) -> None:
    from .websockets_server import run

    logging.config.dictConfig(logging_config(args.log_level))
    main = run(ChatService(settings), args.host, args.port, _listener(args))
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
    # Both --ws choices get the protocol's bounds on outbound bytes, refused handshakes and
    # shutdown; websockets-sansio sends through plain ASGI, as uvicorn's own protocol does.
    ws = WebSocketProtocol.configure(
        max_write_buffer=settings.max_write_buffer,
        close_wait=CLOSE_WAIT,
        offer_frames=args.ws == "wsbroadcast",
    )
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=logging_config(args.log_level),
        lifespan="on",
        # A deadline and size limits on request heads, handshakes included (uvicorn has
        # neither); whichever WebSocket protocol --ws names.
        http=HttpToolsProtocol.configure(head_timeout=settings.handshake_timeout),
        ws=ws,
        # Connections that will not close (a client that stopped reading) are cut after it.
        timeout_graceful_shutdown=settings.shutdown_timeout,
        # The server refuses oversized frames itself (close 1009) before buffering them.
        ws_max_size=settings.max_message_bytes,
        # Frames are encoded once and shared by every recipient; compression would redo it
        # per connection (and make ws_max_size apply after decompression).
        ws_per_message_deflate=False,
    )
    logging.getLogger("uvicorn.error").addFilter(_ClientMistakeFilter())
    server = _Server(config)
    try:
        listener = _listener(args)
    except OSError as exc:  # the address is in use, say
        logging.getLogger("uvicorn.error").error("cannot serve: %s", exc)
        sys.exit(3)
    server.run(sockets=None if listener is None else [listener])
    if not server.started:
        sys.exit(3)


def _listener(args: argparse.Namespace) -> socket.socket | None:
    """The listening socket, when the server must not make its own: a worker's (bound with
    SO_REUSEPORT, beside its siblings) or one with ``--send-buffer``."""
    if not args.reuse_port and args.send_buffer is None:
        return None
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.create_server(
        (args.host, args.port), family=family, reuse_port=args.reuse_port
    )
    if args.send_buffer is not None:
        # Accepted sockets inherit it: it caps the kernel memory a client that stops reading
        # can hold (Linux autotunes it up to net.ipv4.tcp_wmem, 4 MiB by default).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.send_buffer)
    return listener


def _supervise(workers: int, argv: list[str]) -> int:
    """Run ``workers`` copies of this server on one port until they all exit; forward SIGINT
    and SIGTERM to them. If one exits with an error, stop the others and return its status."""
    command = [sys.executable, "-m", "examples.chat_app", *argv]
    children = [subprocess.Popen(command) for _ in range(workers)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    status = 0
    pending = list(children)
    while pending:
        pid, code = os.wait()
        exited = next((child for child in pending if child.pid == pid), None)
        if exited is None:
            continue
        pending.remove(exited)
        exited.returncode = os.waitstatus_to_exitcode(code)
        if exited.returncode and not status:
            status = exited.returncode if exited.returncode > 0 else 1
            forward(signal.SIGTERM, None)
    return status


if __name__ == "__main__":
    main()
