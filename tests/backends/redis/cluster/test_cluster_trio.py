"""Outside asyncio: the cluster backend is refused on trio with a clear error naming it, and
can be built with no loop at all (from configuration, before any loop runs)."""

from __future__ import annotations

import pytest

from wsbroadcast.backends.redis import RedisClusterBackend

UNREACHABLE = "redis+cluster://127.0.0.1:1/"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_refuses_trio_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"^RedisClusterBackend runs on asyncio only"):
        async with RedisClusterBackend(UNREACHABLE):
            pass


def test_builds_outside_an_event_loop() -> None:
    health = RedisClusterBackend(UNREACHABLE).health()
    assert (health.status, health.backend, health.connected) == (
        "degraded",
        "RedisClusterBackend",
        False,
    )
