"""``--jwt-secret``: a WebSocket needs a signed token whose ``sub`` is its client id."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from examples.chat_app.service import check_token
from tests.chat_app.frames import next_frame

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

SECRET = "a-test-secret-of-at-least-32-characters!"


def token(sub: str = "alice", secret: str = SECRET, **claims: Any) -> str:
    claims.setdefault("exp", int(time.time()) + 600)
    return jwt.encode({"sub": sub, **claims}, secret, algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_server(start_server: StartServer) -> ChatServer:
    return start_server("--jwt-secret", SECRET)


@pytest.mark.anyio
@asyncio_only
async def test_a_valid_token_lets_its_client_in(jwt_server: ChatServer) -> None:
    url = f"{jwt_server.ws_url}/ws/alice?room=chat%3Alobby&token={token(rooms=['chat:*'])}"
    async with connect(url) as ws:
        join = await next_frame(ws)
    assert (join["type"], join["client_id"], join["room"]) == ("join", "alice", "chat:lobby")


@pytest.mark.parametrize(
    ("client_id", "room", "given"),
    [
        ("alice", "lobby", None),
        ("alice", "lobby", "not-a-jwt"),
        ("mallory", "lobby", token("alice")),
        ("alice", "lobby", token(secret="another-secret-of-at-least-32-characters")),
        ("alice", "lobby", token(exp=int(time.time()) - 10)),
        ("alice", "lobby", jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")),  # no exp
        # "none" signs with no key: the token every server must refuse.
        ("alice", "lobby", jwt.encode({"sub": "alice", "exp": 2**40}, None, algorithm="none")),  # type: ignore[arg-type]
        ("alice", "other", token(rooms=["chat:*", "lobby"])),
        ("alice", "lobby", token(rooms="lobby")),
    ],
)
@pytest.mark.anyio
@asyncio_only
async def test_a_bad_token_gets_403_before_accept(
    jwt_server: ChatServer, client_id: str, room: str, given: str | None
) -> None:
    url = f"{jwt_server.ws_url}/ws/{client_id}?room={room}"
    if given is not None:
        url += f"&token={given}"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 403
    metrics = httpx.get(f"{jwt_server.url}/metrics", timeout=5).text
    assert 'chat_connections_refused_total{reason="bad_token"}' in metrics


def test_rooms_wildcards_match_whole_names_and_nothing_else() -> None:
    allowed = token(rooms=["orders.*", "user#42"])
    assert check_token(allowed, SECRET, "alice", "orders.eu-1") is None
    assert check_token(allowed, SECRET, "alice", "user#42") is None
    assert check_token(allowed, SECRET, "alice", "user#421") is not None
    assert check_token(allowed, SECRET, "alice", "ordersXeu") is not None
    assert check_token(token(rooms=["a?c"]), SECRET, "alice", "abc") is not None
