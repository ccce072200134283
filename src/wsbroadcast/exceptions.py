"""Every exception wsbroadcast raises on purpose.

The hierarchy, so that callers can catch as broadly or as narrowly as they need::

    WSBroadcastError                 root: catch this to catch anything of ours
    ├── InvalidInput (ValueError)    a caller passed something we refuse; nothing was published
    │   ├── InvalidName              a room, client id or envelope type is empty, too long or odd
    │   ├── InvalidData              the payload is not a JSON value
    │   ├── InvalidBackendURL        a backend URL names no known backend or has bad options
    │   │   └── InvalidBackendOptions
    │   │                            a backend's options are refused (given in a URL or not)
    │   ├── AlreadyJoined            join: the connection is in that room already
    │   ├── NotJoined                leave: the connection is not in that room
    │   └── Forbidden                join: another client's personal stream
    ├── ManagerNotRunning (RuntimeError)
    │                                the ConnectionManager is used outside ``async with``
    ├── BackendError                 the backend failed to do what was asked
    │   └── BackendUnavailable       the backend cannot be reached right now (retry later)
    ├── client.NotConnected (ConnectionError)
    │                                the client cannot send now (nothing is queued)
    └── client.ClientClosed (ConnectionError)
                                     the server ended the client's session for good

Exceptions raised by a transport (a dead socket) never escape a broadcast: they close the one
connection concerned, as documented in `wsbroadcast.manager`.
"""

from __future__ import annotations

__all__ = [
    "AlreadyJoined",
    "BackendError",
    "BackendUnavailable",
    "Forbidden",
    "InvalidBackendOptions",
    "InvalidBackendURL",
    "InvalidData",
    "InvalidInput",
    "InvalidName",
    "ManagerNotRunning",
    "NotJoined",
    "WSBroadcastError",
]


class WSBroadcastError(Exception):
    """Root of every exception wsbroadcast raises on purpose."""


class InvalidInput(WSBroadcastError, ValueError):
    """A caller passed a value the library refuses. Nothing was published or changed."""


class InvalidName(InvalidInput):
    """A room, client id or envelope type is not 1-64 characters of ``A-Z a-z 0-9 _ . - : # @``.

    The grammar is `wsbroadcast.names`.

    ``field`` says which argument was refused, so that an application can turn it into a
    precise error for its own client.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r}: {reason}")


class InvalidData(InvalidInput):
    """The payload of a broadcast is not a JSON value (or contains NaN or infinity)."""


class InvalidBackendURL(InvalidInput):
    """A backend URL has an unknown scheme or options the backend does not accept."""


class InvalidBackendOptions(InvalidBackendURL):
    """A backend refuses its options, whether they came in a URL's query or as arguments
    (or, for a cluster, disagree with what the other nodes use).

    A subclass of `InvalidBackendURL`, which was raised here before, so that code that
    catches it goes on working.
    """


class AlreadyJoined(InvalidInput):
    """`join` of a room the connection is in (or joining)."""


class NotJoined(InvalidInput):
    """`leave` of a room the connection is not in."""


class Forbidden(InvalidInput):
    """A connection may not join this room: it is another client's personal stream."""


class ManagerNotRunning(WSBroadcastError, RuntimeError):
    """The `ConnectionManager` was used before ``async with`` or after it."""


class BackendError(WSBroadcastError):
    """The backend failed to publish, store or deliver."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached right now; the operation did not happen and may be retried."""
