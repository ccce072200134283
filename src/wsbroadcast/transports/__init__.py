"""Adapters from web servers' WebSocket objects to :class:`wsbroadcast.Transport`.

Each adapter lives in its own module and imports its server library only when that module is
imported, so installing wsbroadcast pulls in no web framework:

- :mod:`wsbroadcast.transports.starlette` (extra ``wsbroadcast[starlette]``): Starlette and
  FastAPI. Their ``WebSocket`` already fits :class:`~wsbroadcast.Transport`; the adapter adds
  tolerant closing, and :func:`~wsbroadcast.transports.starlette.starlette_transport` takes
  the fast path where the server offers the ``wsbroadcast.frames`` ASGI extension.
- :mod:`wsbroadcast.transports.uvicorn` (extra ``wsbroadcast[uvicorn]``): not a transport but
  a uvicorn WebSocket protocol that offers that extension.
- :mod:`wsbroadcast.transports.websockets` (extra ``wsbroadcast[websockets]``): the
  ``websockets`` library's asyncio server connections.
"""
