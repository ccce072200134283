"""The chat app's HTTP responses, whatever server sends them: `HttpResponse`, which
each front end turns into its own response type, and the helpers that build its bodies."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Final

from pydantic import JsonValue

from .edge import ClientError

__all__ = ["CLIENT_JS", "CLIENT_JS_PATH", "HttpResponse", "chat_page", "client_script"]

CLIENT_JS: Final = (
    Path(__file__).resolve().parents[2] / "clients" / "js" / "src" / "wsbroadcast-client.js"
)
"""The JavaScript client, served as is (the one source: no copy) for chat.html to import."""
CLIENT_JS_PATH: Final = "/wsbroadcast-client.js"
"""Where the front ends serve `CLIENT_JS`."""


@dataclass(frozen=True)
class HttpResponse:
    """A plain HTTP response, which each front end turns into its server's own type."""

    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: JsonValue, status: int = HTTPStatus.OK) -> HttpResponse:
        """A compact UTF-8 JSON response."""
        body = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return cls(status, "application/json", body.encode())


def _api_error(error: ClientError, status: int = HTTPStatus.BAD_REQUEST) -> HttpResponse:
    """An HTTP API error: ``{"error": {"code", "detail"}}``, the WebSocket error's data."""
    return HttpResponse.json({"error": {"code": error.code, "detail": error.detail}}, status)


def _inline_hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for each inline ``<tag>`` of ``html``, with
    or without attributes (``<script type="module">``); one with ``src`` is not inline."""
    hashes = []
    for attributes, body in re.findall(rf"<{tag}(\s[^>]*)?>(.*?)</{tag}>", html, flags=re.DOTALL):
        if re.search(r"\bsrc\s*=", attributes):
            continue
        digest = hashlib.sha256(body.encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return hashes


_HARDENING: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def chat_page(html: str) -> HttpResponse:
    """``GET /``: the page, with a CSP that allows its own inline script and style (by hash),
    scripts from its own origin (the client module, `CLIENT_JS_PATH`), and connections
    to its own origin; nothing else."""
    csp = [
        "default-src 'none'",
        f"script-src 'self' {' '.join(_inline_hashes(html, 'script'))}",
        f"style-src {' '.join(_inline_hashes(html, 'style'))}",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
    headers = {"Content-Security-Policy": "; ".join(csp), "X-Frame-Options": "DENY", **_HARDENING}
    return HttpResponse(HTTPStatus.OK, "text/html; charset=utf-8", html.encode(), headers)


def client_script(path: Path = CLIENT_JS) -> HttpResponse:
    """``GET /wsbroadcast-client.js``: the JavaScript client, read from ``path`` (an ES module
    served as ``text/javascript``, which module scripts require)."""
    return HttpResponse(
        HTTPStatus.OK,
        "text/javascript; charset=utf-8",
        path.read_bytes(),
        {"Content-Security-Policy": "default-src 'none'", **_HARDENING},
    )
