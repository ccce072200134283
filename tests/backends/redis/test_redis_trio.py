"""Outside asyncio: refused on trio with a clear error, and buildable with no loop at all."""

from __future__ import annotations

import pytest

from tests.backends.redis.redis_helpers import RedisServer
from wsbroadcast.backends.redis import RedisBackend


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_trio_with_a_clear_error(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with RedisBackend(redis_server.url):
            pass


def test_builds_outside_an_event_loop() -> None:
    """Applications build backends from configuration before any loop runs."""
    backend = RedisBackend("redis://127.0.0.1:1/0")
    assert backend.health().status == "degraded"
