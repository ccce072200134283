"""wsbroadcast: WebSocket broadcast that no slow client can stall.

Ordered, sequenced, resumable broadcast to rooms of WebSocket connections, with presence,
over pluggable transports (the socket) and backends (where messages are ordered and stored).
The core imports no web framework and no broker client.
"""

from __future__ import annotations

from .backend import (
    Backend,
    History,
    Listener,
    ResetListener,
    StreamReset,
    Subscription,
    backend_from_url,
)
from .connection import Connection, ConnectionStatistics
from .envelope import Draft, Envelope
from .exceptions import (
    AlreadyJoined,
    BackendError,
    BackendUnavailable,
    Forbidden,
    InvalidBackendURL,
    InvalidData,
    InvalidInput,
    InvalidName,
    ManagerNotRunning,
    NotJoined,
    WSBroadcastError,
)
from .manager import RESERVED_TYPES, ConnectionManager, ManagerStats
from .names import (
    NAME_CHARACTERS,
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    USER_ROOM_PREFIX,
    check_name,
    is_user_room,
    is_valid_name,
    user_room,
)
from .outbound import (
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    ConnectionState,
    OutboundQueue,
    QueueStatistics,
    SlowConsumerPolicy,
)
from .protocol import CloseCode, control_frame, error_frame
from .publisher import Publisher
from .transport import Transport

__version__ = "0.2.0.dev0"

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "NAME_CHARACTERS",
    "NAME_MAX_LENGTH",
    "NAME_PATTERN",
    "RESERVED_TYPES",
    "USER_ROOM_PREFIX",
    "AlreadyJoined",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CloseCode",
    "Connection",
    "ConnectionManager",
    "ConnectionState",
    "ConnectionStatistics",
    "Draft",
    "Envelope",
    "Forbidden",
    "History",
    "InvalidBackendURL",
    "InvalidData",
    "InvalidInput",
    "InvalidName",
    "Listener",
    "ManagerNotRunning",
    "ManagerStats",
    "NotJoined",
    "OutboundQueue",
    "Publisher",
    "QueueStatistics",
    "ResetListener",
    "SlowConsumerPolicy",
    "StreamReset",
    "Subscription",
    "Transport",
    "WSBroadcastError",
    "backend_from_url",
    "check_name",
    "control_frame",
    "error_frame",
    "is_user_room",
    "is_valid_name",
    "user_room",
]
