"""The chat app's HTTP responses, whatever server sends them: :class:`HttpResponse`, which
each front end turns into its own response type, and the helpers that build its bodies."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from pydantic import JsonValue

from .edge import ClientError

__all__ = ["HttpResponse"]


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
    """CSP source expressions (``'sha256-...'``) for each inline ``<tag>`` of ``html``."""
    hashes = []
    for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL):
        digest = hashlib.sha256(body.encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return hashes
