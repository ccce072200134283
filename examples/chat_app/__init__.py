"""The reference chat app: one static ``chat.html``, hardened at the edge.

Run it with ``python -m examples.chat_app --host 127.0.0.1 --port 8000`` (Starlette on
uvicorn) or with ``--server websockets`` (the ``websockets`` library's server, the fast
path). The ASGI app is ``examples.chat_app.app:app``, built by
`examples.chat_app.app.create_app`; the protocol both serve is
`examples.chat_app.service.ChatService`.
"""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
