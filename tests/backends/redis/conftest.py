"""A real redis-server per test, on a free port of 127.0.0.1, with persistence off."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.backends.redis.redis_helpers import RedisServer
from wsbroadcast.backends.redis import RedisBackend


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test, killed at teardown."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not installed: the Redis backend tests need a real server "
            "(scripts/test installs it with apt-get install redis-server)"
        )
    server = RedisServer(executable)
    server.start()
    try:
        yield server
    finally:
        server.kill()


FAST = {
    "heartbeat_interval": 0.1,
    "presence_ttl": 0.5,
    "block_timeout": 1.0,
    "command_timeout": 1.0,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
}


@pytest.fixture
def make_backend(redis_server: RedisServer) -> Callable[..., RedisBackend]:
    """Build RedisBackend nodes on the test's server, with timings in tenths of seconds."""

    def make(**options: Any) -> RedisBackend:
        return RedisBackend(redis_server.url, **{**FAST, **options})

    return make
