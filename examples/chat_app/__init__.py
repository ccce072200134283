"""The reference chat app: Starlette, one static ``chat.html``, hardened at the edge.

Run it with ``python -m examples.chat_app --host 127.0.0.1 --port 8000``; the ASGI app is
``examples.chat_app.app:app``, built by :func:`examples.chat_app.app.create_app`.
"""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
