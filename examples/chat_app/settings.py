"""The chat app's settings: `Settings`, everything the command line can set, checked
when it is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from wsbroadcast import DEFAULT_QUEUE_SIZE

from .edge import _normalize_origin

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Everything the command line can set; `create_app` builds an app from it."""

    backend: str = "memory://"
    """Backend URL for `wsbroadcast.backend_from_url`."""
    rate_limit: float = 20
    """Frames per second per client id, across its tabs and (on Redis) nodes; bursts of
    ``2 * rate_limit``. 0 turns it off (and the per-IP limit, unless that is set)."""
    ip_rate_limit: float | None = None
    """Frames per second per IP address, across its client ids (bursts of twice that);
    None: five times `rate_limit`; 0 turns it off."""
    max_connections_per_ip: int = 256
    """WebSocket connections one IP address may have open on this process; 0: no cap."""
    handshake_timeout: float = 10.0
    """Seconds a client has to send its request line and headers."""
    max_write_buffer: int = 4 * 1024 * 1024
    """Bytes a connection's socket write buffer may hold (pongs included) before it is closed
    as a slow consumer with 4008."""
    shutdown_timeout: int = 10
    """Seconds the server waits for connections and tasks on shutdown before cutting them."""
    max_message_bytes: int = 65536
    """Largest frame accepted (UTF-8 bytes); a larger one closes the connection with 1009."""
    max_text: int = 4000
    """Most characters in a chat message."""
    queue_size: int = DEFAULT_QUEUE_SIZE
    """Frames each connection may have waiting before it is closed as a slow consumer."""
    history: int | None = None
    """Envelopes kept per room for resume (``history=N`` in the backend URL); None: default."""
    allowed_origins: tuple[str, ...] = ()
    """Origins besides the server's own that may open a WebSocket (``scheme://host[:port]``)."""
    slow_consumer: str = "disconnect"
    """The manager's slow-consumer policy."""
    jwt_secret: str | None = None
    """When set, a WebSocket needs ``?token=``: an HS256 JWT signed with this secret whose
    ``sub`` is the client id, with an ``exp``, and optionally ``rooms`` (names, ``*``
    wildcards) the client may join. None: no token (anyone may connect as any id)."""
    api_keys: tuple[str, ...] = ()
    """Keys that may ``POST /api/rooms/{room}/messages`` (``Authorization: Bearer KEY``);
    none: the route is off (404)."""
    max_rooms: int = 32
    """Rooms one connection may be in at once (its first room included, its personal
    stream not): a ``join`` past it gets ``too_many_rooms``."""
    gc_freeze: bool | None = None
    """The garbage collector's full collections (`wsbroadcast.gcpauses.GCPauses`, installed
    while the app runs): True freezes their survivors, so that a pause is proportional to
    what changed since the last one and not to the number of connections; False only
    measures them; None leaves the collector alone (an app embedded in a process that has
    its own policy, or several apps in one process, as the tests run them). Either way
    but None, ``/metrics`` reports the pauses (``chat_gc_*``). ``python -m
    examples.chat_app`` freezes unless given ``--no-gc-freeze``."""

    def __post_init__(self) -> None:
        for name in ("rate_limit", "ip_rate_limit"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
        if not (self.handshake_timeout > 0 and math.isfinite(self.handshake_timeout)):
            raise ValueError(f"handshake_timeout must be positive, not {self.handshake_timeout}")
        if self.max_connections_per_ip < 0:
            raise ValueError(
                f"max_connections_per_ip must be >= 0, not {self.max_connections_per_ip}"
            )
        for name in (
            "max_message_bytes",
            "max_text",
            "queue_size",
            "max_write_buffer",
            "max_rooms",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.history is not None and self.history < 0:
            raise ValueError(f"history must be >= 0, not {self.history}")
        if self.shutdown_timeout < 1:
            raise ValueError(f"shutdown_timeout must be at least 1, not {self.shutdown_timeout}")
        if self.jwt_secret is not None and len(self.jwt_secret) < 32:
            raise ValueError("jwt_secret must be at least 32 characters (HS256 wants 256 bits)")
        for key in self.api_keys:
            if len(key) < 16 or not key.isprintable() or " " in key:
                raise ValueError("api keys must be at least 16 printable characters, no space")
        for origin in self.allowed_origins:
            if _normalize_origin(origin) is None:
                raise ValueError(f"allowed_origins: {origin!r} is not scheme://host[:port]")

    @property
    def effective_ip_rate_limit(self) -> float:
        """`ip_rate_limit`, or five times `rate_limit` when it is None."""
        return 5 * self.rate_limit if self.ip_rate_limit is None else self.ip_rate_limit

    def backend_url(self) -> str:
        """The backend URL, with ``history=N`` added when `history` is set."""
        if self.history is None:
            return self.backend
        base, _, query = self.backend.partition("?")
        options = [(k, v) for k, v in parse_qsl(query) if k != "history"]
        options.append(("history", str(self.history)))
        return f"{base}?{urlencode(options)}"
