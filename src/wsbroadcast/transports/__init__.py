"""Transports: the interface in `wsbroadcast.transports.base`, and adapters from web servers'
WebSocket objects to `Transport`.

Each adapter lives in its own module and imports its server library only when that module is
imported, so installing wsbroadcast pulls in no web framework; the names below are importable
from here too, each module imported on first use:

- `wsbroadcast.transports.starlette` (extra `wsbroadcast[starlette]`): Starlette and
  FastAPI. Their `WebSocket` already fits `Transport`; the adapter adds tolerant closing,
  and `starlette_transport` takes the fast path where the server offers the
  `wsbroadcast.frames` ASGI extension.
- `wsbroadcast.transports.uvicorn` (extra `wsbroadcast[uvicorn]`): not a transport but
  a uvicorn WebSocket protocol, `WebSocketProtocol`, that offers that extension.
- `wsbroadcast.transports.websockets` (extra `wsbroadcast[websockets]`): the
  `websockets` library's asyncio server connections, `WebsocketsTransport`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .base import (
    FRAMES_EXTENSION,
    BatchTransport,
    FramesExtension,
    NowaitBatchTransport,
    Transport,
)

if TYPE_CHECKING:
    from .starlette import StarletteFramesTransport, StarletteTransport, starlette_transport
    from .uvicorn import WebSocketProtocol
    from .websockets import WebsocketsTransport

__all__ = [
    "FRAMES_EXTENSION",
    "BatchTransport",
    "FramesExtension",
    "NowaitBatchTransport",
    "StarletteFramesTransport",
    "StarletteTransport",
    "Transport",
    "WebSocketProtocol",
    "WebsocketsTransport",
    "starlette_transport",
]

_ADAPTERS = {
    "StarletteFramesTransport": "wsbroadcast.transports.starlette",
    "StarletteTransport": "wsbroadcast.transports.starlette",
    "starlette_transport": "wsbroadcast.transports.starlette",
    "WebSocketProtocol": "wsbroadcast.transports.uvicorn",
    "WebsocketsTransport": "wsbroadcast.transports.websockets",
}


__getattr__ = lazy_attributes(__name__, _ADAPTERS)
