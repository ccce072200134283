from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from wsbroadcast import ConnectionManager


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def manager_queue_size() -> int:
    """The ``queue_size`` of the ``manager`` fixture's manager.

    A test that needs another says so with
    ``@pytest.mark.parametrize("manager_queue_size", [8])``.
    """
    return 64


@pytest.fixture
async def manager(manager_queue_size: int) -> AsyncIterator[ConnectionManager]:
    """A running manager on a memory backend, shut down after the test."""
    async with ConnectionManager(queue_size=manager_queue_size) as manager:
        yield manager
