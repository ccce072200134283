"""Backends: the interface in `wsbroadcast.backends.base`, and the adapters.

`backend_from_url` imports a backend's module from its URL scheme, only when it is used;
the adapters' classes are importable from here too, each imported on first use, so that
importing wsbroadcast imports no broker client:

- `MemoryBackend` (`wsbroadcast.backends.memory`, `memory://`): in-process.
- `RedisBackend` and `RedisClusterBackend` (`wsbroadcast.backends.redis`, `redis://`,
  `rediss://`, `redis+cluster://`; extra `wsbroadcast[redis]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .base import (
    Backend,
    BackendHealth,
    History,
    Listener,
    ResetListener,
    StreamReset,
    Subscription,
    backend_from_url,
)

if TYPE_CHECKING:
    from .memory import MemoryBackend
    from .redis import RedisBackend, RedisClusterBackend

__all__ = [
    "Backend",
    "BackendHealth",
    "History",
    "Listener",
    "MemoryBackend",
    "RedisBackend",
    "RedisClusterBackend",
    "ResetListener",
    "StreamReset",
    "Subscription",
    "backend_from_url",
]

_ADAPTERS = {
    "MemoryBackend": "wsbroadcast.backends.memory",
    "RedisBackend": "wsbroadcast.backends.redis",
    "RedisClusterBackend": "wsbroadcast.backends.redis",
}


__getattr__ = lazy_attributes(__name__, _ADAPTERS)
