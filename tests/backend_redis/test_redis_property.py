"""Property: publishes interleaved across nodes reach every node in one gap-free order."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_helpers import ASYNCIO_ONLY, Recorder

from wsbroadcast.backends.redis import RedisBackend

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

NODES = 3

# Each publish: (node it goes through, sender on that node, scheduler turns to wait first).
publishes = st.lists(
    st.tuples(st.integers(0, NODES - 1), st.integers(0, 2), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=publishes)
async def test_one_order_everywhere(make_backend: Callable[..., RedisBackend], plan: list) -> None:
    room = uuid.uuid4().hex[:16]
    senders: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index, (node, sender, turns) in enumerate(plan):
        senders.setdefault((node, sender), []).append((index, turns))
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(make_backend()) for _ in range(NODES)]
        recorders = [Recorder() for _ in nodes]
        for node, recorder in zip(nodes, recorders, strict=True):
            await node.subscribe(room, recorder)

        async def send(node: int, sender: int, items: list[tuple[int, int]]) -> None:
            for index, turns in items:
                for _ in range(turns):
                    await anyio.lowlevel.checkpoint()
                await nodes[node].publish(room, "message", f"n{node}s{sender}", index)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for (node, sender), items in senders.items():
                    tg.start_soon(send, node, sender, items)
            for recorder in recorders:
                await recorder.wait_for(len(plan))

        order = [envelope.id for envelope in recorders[0].envelopes]
        for node, recorder in zip(nodes, recorders, strict=True):
            assert recorder.seqs == list(range(1, len(plan) + 1))
            assert [envelope.id for envelope in recorder.envelopes] == order
            history = await node.history(room, 0)
            assert history.complete
            assert [envelope.id for envelope in history.envelopes] == order
        for (node, sender), items in senders.items():
            sent = [e.data for e in recorders[0].envelopes if e.client_id == f"n{node}s{sender}"]
            assert sent == [index for index, _ in items]
