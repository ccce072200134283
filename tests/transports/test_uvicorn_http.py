"""wsbroadcast's httptools HTTP protocol for uvicorn (wsbroadcast.transports.uvicorn_http):
the deadline and size limits on a request's head, on a real uvicorn over loopback."""

from __future__ import annotations

import anyio
import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from tests.transports.support import raw_exchange, upgrade_request, uvicorn_server
from wsbroadcast.transports.uvicorn import WebSocketProtocol
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


async def greet(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


async def exchange(request: bytes, http: type[HttpToolsProtocol] = HttpToolsProtocol) -> bytes:
    """``request`` sent raw to a uvicorn serving with ``http``; everything it answered."""
    async with uvicorn_server(greet, WebSocketProtocol, deflate=False, http=http) as url:
        return await anyio.to_thread.run_sync(raw_exchange, url, request)


def status_of(response: bytes) -> bytes:
    return response.split(b" ", 2)[1]


async def test_requests_within_the_limits_are_uvicorns() -> None:
    """Two requests on one keep-alive connection are answered, and a handshake upgrades."""
    request = b"GET /http HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    closing = b"GET /http HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = await exchange(request + closing)
    assert response.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert response.endswith(b"ok")
    async with (
        uvicorn_server(greet, WebSocketProtocol, deflate=False, http=HttpToolsProtocol) as url,
        connect(url) as client,
    ):
        assert await client.recv() == "hello"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_request("/?pad=" + "p" * 9000), b"414"),
        (upgrade_request("/", "".join(f"X-{n}: {n}\r\n" for n in range(200))), b"431"),
        (upgrade_request("/", "".join(f"X-{n}: {'v' * 1000}\r\n" for n in range(20))), b"431"),
        # One header far over the limit, never finished: counted as it arrives.
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"v" * 40000, b"431"),
    ],
    ids=["request-line", "header-count", "head-size", "unfinished-header"],
)
async def test_a_head_over_a_limit_is_refused_with_its_status_and_closed(
    request_bytes: bytes, status: bytes
) -> None:
    response = await exchange(request_bytes)
    assert status_of(response) == status, response[:200]
    assert b"connection: close\r\n" in response
    body = response.split(b"\r\n\r\n", 1)[1]
    assert body.endswith(b"\n")
    assert len(body) == int(response.split(b"content-length: ")[1].split(b"\r\n")[0])


async def test_a_head_that_does_not_arrive_in_time_gets_408() -> None:
    """A client that sends part of its head and waits is answered 408 at the deadline."""
    quick = HttpToolsProtocol.configure(head_timeout=0.2)
    response = await exchange(b"GET /http HTTP/1.1\r\nHost: 127.0.0.1\r\n", http=quick)
    assert status_of(response) == b"408"
    assert response.endswith(b"Request Timeout\n")


async def test_what_is_not_http_gets_uvicorns_400() -> None:
    response = await exchange(b"NOT HTTP AT ALL\r\n\r\n")
    assert status_of(response) == b"400"
    assert b"Invalid HTTP request received." in response


async def test_configure_makes_a_subclass_with_other_limits() -> None:
    strict = HttpToolsProtocol.configure(max_request_line=100, max_headers=2)
    assert issubclass(strict, HttpToolsProtocol)
    assert strict.__name__ == "HttpToolsProtocol"
    assert (strict.max_request_line, strict.max_headers) == (100, 2)
    assert (strict.head_timeout, strict.max_head) == (10.0, 16384)  # None keeps a limit
    assert HttpToolsProtocol.max_request_line == 8192  # the original is untouched
    for bad in ({"head_timeout": 0.0}, {"max_head": -1}):
        with pytest.raises(ValueError, match="must be positive"):
            HttpToolsProtocol.configure(**bad)
    response = await exchange(upgrade_request("/?pad=" + "p" * 200), http=strict)
    assert status_of(response) == b"414"
