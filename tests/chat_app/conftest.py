"""Fixtures for the chat app's tests: the app started as a user starts it, in a subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chat_app.servers import SERVER_KINDS, ChatServer, StartServer


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start chat app subprocesses with the given flags; all are killed at teardown."""
    servers: list[ChatServer] = []

    def start(*args: str, kind: str = "uvicorn") -> ChatServer:
        server = ChatServer(tmp_path_factory.mktemp("chat-server"), list(args), kind)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """Each test that uses it runs on uvicorn (fast path and plain ASGI) and on websockets."""
    return str(request.param)
