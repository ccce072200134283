"""wsbroadcast: WebSocket broadcast that no slow client can stall.

Ordered, sequenced, resumable broadcast to rooms of WebSocket connections, with presence,
over pluggable transports (the socket) and backends (where messages are ordered and stored).
The core imports no web framework and no broker client.
"""

from __future__ import annotations

from ._deprecated import renamed_names
from .backends.base import (
    Backend,
    BackendHealth,
    History,
    Listener,
    ResetListener,
    StreamReset,
    Subscription,
    backend_from_url,
)
from .connection import Connection, ConnectionStatistics
from .control import RESERVED_TYPES, CloseCode, ControlMessage
from .control import control_frame as control_frame  # deprecated: warns when called
from .control import error_frame as error_frame  # deprecated: warns when called
from .envelope import Draft, Envelope
from .exceptions import (
    AlreadyJoined,
    BackendError,
    BackendUnavailable,
    Forbidden,
    InvalidBackendOptions,
    InvalidBackendURL,
    InvalidData,
    InvalidInput,
    InvalidName,
    ManagerNotRunning,
    NotJoined,
    WSBroadcastError,
)
from .gcpauses import GCPauses, GCPauseStatistics
from .manager import ConnectionManager, ManagerStatistics
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
    OutboundMessage,
    OutboundQueue,
    QueueStatistics,
    SlowConsumerPolicy,
)
from .publisher import Publisher
from .transports.base import Transport

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
    "BackendHealth",
    "BackendUnavailable",
    "CloseCode",
    "Connection",
    "ConnectionManager",
    "ConnectionState",
    "ConnectionStatistics",
    "ControlMessage",
    "Draft",
    "Envelope",
    "Forbidden",
    "GCPauseStatistics",
    "GCPauses",
    "History",
    "InvalidBackendOptions",
    "InvalidBackendURL",
    "InvalidData",
    "InvalidInput",
    "InvalidName",
    "Listener",
    "ManagerNotRunning",
    "ManagerStatistics",
    "NotJoined",
    "OutboundMessage",
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
    "is_user_room",
    "is_valid_name",
    "user_room",
]

__getattr__ = renamed_names(
    "wsbroadcast", {"ManagerStats": ("wsbroadcast.manager", "ManagerStatistics")}
)
