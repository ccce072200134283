"""``POST /api/rooms/{room}/messages``: publishing from an HTTP client, as the server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.chat_app.frames import next_frame

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"


@pytest.fixture(scope="module")
def api_server(start_server: StartServer) -> ChatServer:
    return start_server("--api-key", KEY, "--api-key", OTHER_KEY, "--max-text", "100")


@asynccontextmanager
async def watcher(server: ChatServer, room: str) -> AsyncIterator[ClientConnection]:
    async with connect(f"{server.ws_url}/ws/watcher?room={room}") as ws:
        assert (await recv(ws))["type"] == "join"
        yield ws


async def recv(ws: ClientConnection) -> Any:
    return await next_frame(ws)


def post(server: ChatServer, room: str, body: object, key: str | None = KEY, **kw: Any) -> Any:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    headers.update(kw.pop("headers", {}))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/api/rooms/{room}/messages", content=content, headers=headers, timeout=5
    )


async def test_a_post_with_a_key_is_broadcast_as_the_server(api_server: ChatServer) -> None:
    async with watcher(api_server, "news") as ws:
        for key in (KEY, OTHER_KEY):
            response = post(api_server, "news", {"message": "deploy done"}, key=key)
            assert response.status_code == 202
            envelope = response.json()
            assert (envelope["type"], envelope["room"], envelope["client_id"]) == (
                "message",
                "news",
                None,
            )
            received = await recv(ws)
            assert received == envelope


@pytest.mark.parametrize(
    ("key", "status"),
    [(None, 401), ("wrong-key-0123456789abcdef", 401), (KEY[:-1], 401), (KEY + "x", 401)],
)
async def test_no_valid_key_no_publish(
    api_server: ChatServer, key: str | None, status: int
) -> None:
    response = post(api_server, "news", {"message": "forged"}, key=key)
    assert response.status_code == status
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{api_server.url}/rooms/news", timeout=5).json()["seq"] >= 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        ([1, 2], 400, "not_an_object"),
        ({"text": "hi"}, 400, "missing_message"),
        ({"message": 5}, 400, "message_not_a_string"),
        ({"message": "  "}, 400, "empty_message"),
        ({"message": "x" * 101}, 400, "message_too_long"),
        (b'{"message": "\\ud800"}', 400, "invalid_message"),
        (b"x" * 70_000, 413, "message_too_big"),
    ],
)
async def test_bad_bodies_get_the_websocket_error_codes_and_publish_nothing(
    api_server: ChatServer, body: object, status: int, code: str
) -> None:
    before = httpx.get(f"{api_server.url}/rooms/strict", timeout=5).json()["seq"]
    response = post(api_server, "strict", body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert httpx.get(f"{api_server.url}/rooms/strict", timeout=5).json()["seq"] == before


async def test_content_type_and_room_are_checked(api_server: ChatServer) -> None:
    response = post(api_server, "news", {"message": "hi"}, headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert post(api_server, "bad%20room", {"message": "hi"}).status_code == 400
    assert httpx.get(f"{api_server.url}/api/rooms/news/messages", timeout=5).status_code == 405


async def test_without_a_key_the_route_is_off(start_server: StartServer) -> None:
    server = start_server()
    response = post(server, "news", {"message": "hi"})
    assert response.status_code == 404
