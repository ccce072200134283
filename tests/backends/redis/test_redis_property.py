"""Properties: publishes interleaved across nodes reach every node in one gap-free order, and
hostile payloads are refused whole or delivered identically everywhere."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, Recorder
from wsbroadcast import Envelope
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.exceptions import InvalidData

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
async def test_one_order_everywhere(
    make_backend: Callable[..., RedisBackend], plan: list[tuple[int, int, int]]
) -> None:
    room = uuid.uuid4().hex[:16]
    senders: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index, (node, sender, turns) in enumerate(plan):
        senders.setdefault((node, sender), []).append((index, turns))
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(make_backend()) for _ in range(NODES)]
        recorders = [Recorder() for _ in nodes]
        for backend, recorder in zip(nodes, recorders, strict=True):
            await backend.subscribe(room, recorder)

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
        for backend, recorder in zip(nodes, recorders, strict=True):
            assert recorder.seqs == list(range(1, len(plan) + 1))
            assert [envelope.id for envelope in recorder.envelopes] == order
            history = await backend.history(room, 0)
            assert history.complete
            assert [envelope.id for envelope in history.envelopes] == order
        for (node, sender), items in senders.items():
            sent = [e.data for e in recorders[0].envelopes if e.client_id == f"n{node}s{sender}"]
            assert sent == [index for index, _ in items]


def nested(depth: int, leaf: JsonValue) -> JsonValue:
    """``leaf`` inside ``depth`` alternating lists and objects."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


BIG_INTS = [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**30, -(10**30)]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(BIG_INTS).flatmap(lambda n: st.sampled_from([n - 1, n, n + 1])),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.integers(1, 20_000).map(lambda n: "\u0001" * n),
    st.text(min_size=1000, max_size=5000),
)
hostile = st.one_of(
    st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    ),
    st.tuples(st.integers(55, 300), scalars).map(lambda pair: nested(*pair)),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payloads=st.lists(hostile, min_size=1, max_size=6))
async def test_hostile_payloads_are_refused_whole_or_delivered_identically(
    make_backend: Callable[..., RedisBackend], payloads: list[JsonValue]
) -> None:
    """Each payload is refused with InvalidData and consumes no seq, or it reaches the
    listeners of both nodes, and both nodes' history, as the very text publish returned."""
    room = uuid.uuid4().hex[:16]
    async with make_backend() as a, make_backend() as b:
        recorders = [Recorder(), Recorder()]
        for node, recorder in zip((a, b), recorders, strict=True):
            await node.subscribe(room, recorder, recorder.reset)
        published: list[Envelope] = []
        for index, payload in enumerate(payloads):
            node = (a, b)[index % 2]
            try:
                envelope = await node.publish(room, "message", "mallory", payload)
            except InvalidData:
                continue
            published.append(envelope)
            assert envelope.seq == len(published)  # a refusal consumed no seq
        with anyio.fail_after(10):
            for recorder in recorders:
                await recorder.wait_for(len(published))
        texts = [envelope.text for envelope in published]
        for node, recorder in zip((a, b), recorders, strict=True):
            assert recorder.resets == []
            assert [envelope.text for envelope in recorder.envelopes] == texts
            history = await node.history(room, 0)
            assert history.complete
            assert [envelope.text for envelope in history.envelopes] == texts
        for envelope in published:
            assert Envelope.from_text(envelope.text) == envelope
