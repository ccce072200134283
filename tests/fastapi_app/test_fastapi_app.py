"""The FastAPI example, served by a real uvicorn on 127.0.0.1 and driven by real clients."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fastapi") / "stderr.log"
    command = [
        sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--ws", "wsbroadcast.transports.uvicorn:WebSocketProtocol",
        "--ws-per-message-deflate", "false",
    ]  # fmt: skip
    with log.open("wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling for readiness, bounded by the deadline
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert "Traceback" not in log.read_text()


async def recv(ws: ClientConnection) -> Any:
    with anyio.fail_after(10):
        return json.loads(await ws.recv())


async def opened(stack: AsyncExitStack, base_url: str, path: str) -> ClientConnection:
    ws_url = base_url.replace("http://", "ws://")
    return await stack.enter_async_context(connect(f"{ws_url}{path}"))


def post(base_url: str, path: str, message: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{base_url}{path}", json={"message": message}, headers=headers, timeout=5)


async def test_a_room_over_websocket_and_http(base_url: str) -> None:
    async with AsyncExitStack() as stack:
        alice = await opened(stack, base_url, "/ws/rooms/team?token=alice-token")
        assert (await recv(alice))["client_id"] == "alice"
        bob = await opened(stack, base_url, "/ws/rooms/team?token=bob-token")
        assert (await recv(bob))["client_id"] == "bob"
        assert (await recv(alice))["client_id"] == "bob"

        await alice.send(json.dumps({"message": "hello"}))
        for ws in (alice, bob):
            got = await recv(ws)
            assert (got["client_id"], got["data"]) == ("alice", {"message": "hello"})

        response = post(base_url, "/rooms/team/messages", "from http", "bob-token")
        assert response.status_code == 202
        for ws in (alice, bob):
            assert await recv(ws) == response.json()

        await bob.send("not json")
        error = await recv(bob)
        assert (error["type"], error["data"]["code"]) == ("error", "invalid_message")
        await bob.send(json.dumps({"message": "still here"}))
        assert (await recv(alice))["data"] == {"message": "still here"}


async def test_auth_is_a_dependency(base_url: str) -> None:
    assert post(base_url, "/rooms/team/messages", "x", None).status_code == 401
    assert post(base_url, "/rooms/team/messages", "x", "wrong").status_code == 401
    assert post(base_url, "/rooms/bad%20room/messages", "x", "bob-token").status_code == 400
    ws_url = base_url.replace("http://", "ws://")
    refused_paths = (
        "/ws/rooms/team",
        "/ws/rooms/team?token=wrong",
        "/ws/me?token=nope",
        "/ws/rooms/%40bob?token=alice-token",  # another user's personal stream
        "/ws/rooms/ops%3Aalerts?token=alice-token",  # staff only
    )
    for path in refused_paths:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{ws_url}{path}"):
                pass
        assert refused.value.response.status_code == 403


async def test_a_notification_reaches_every_tab_of_one_user_only(base_url: str) -> None:
    async with AsyncExitStack() as stack:
        tabs = [await opened(stack, base_url, "/ws/me?token=alice-token") for _ in range(2)]
        bob = await opened(stack, base_url, "/ws/me?token=bob-token")
        response = post(base_url, "/users/alice/notify", "your order shipped", "ops-token")
        assert response.status_code == 202
        notice = response.json()
        assert (notice["type"], notice["room"], notice["client_id"]) == ("direct", "@alice", None)
        assert notice["data"] == {"to": "alice", "data": {"notice": "your order shipped"}}
        for ws in tabs:
            assert await recv(ws) == notice
        # bob's stream is his own: the next thing he gets is his own notification.
        mine = post(base_url, "/users/bob/notify", "yours", "ops-token").json()
        assert await recv(bob) == mine


async def test_staff_rooms_admit_staff_and_offline_notices_wait_for_a_resume(base_url: str) -> None:
    async with AsyncExitStack() as stack:
        ops = await opened(stack, base_url, "/ws/rooms/ops%3Aalerts?token=ops-token")
        assert (await recv(ops))["type"] == "join"
        # Nobody of bob's is connected: the notice is kept in his stream for his resume.
        sent = post(base_url, "/users/bob/notify", "while you were away", "ops-token").json()
        # bob resumes from the last notice he saw (the one before: other tests sent him some).
        since, epoch = sent["seq"] - 1, sent["epoch"]
        bob = await opened(stack, base_url, f"/ws/me?token=bob-token&since={since}&epoch={epoch}")
        received = await recv(bob)
        assert received["id"] == sent["id"]
        assert received["data"]["data"] == {"notice": "while you were away"}
