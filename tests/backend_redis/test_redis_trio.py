"""The Redis backend is asyncio-only and says so on trio instead of failing obscurely."""

from __future__ import annotations

import pytest
from redis_helpers import RedisServer

from wsbroadcast.backends.redis import RedisBackend


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_trio_with_a_clear_error(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="asyncio only"):
        async with RedisBackend(redis_server.url):
            pass
