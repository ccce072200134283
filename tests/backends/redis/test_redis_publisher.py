"""A Publisher in another OS process (a worker, a cron job) reaches every node through Redis."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import anyio
import pytest

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, RedisServer
from wsbroadcast import ConnectionManager
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

WORKER = """
import sys

import anyio

from wsbroadcast import Publisher


async def main() -> None:
    async with Publisher(sys.argv[1]) as publisher:
        for n in range(3):
            envelope = await publisher.publish("jobs", {"job": n, "state": "done"})
            print(envelope.text, flush=True)
        await publisher.publish("jobs", "by name", client_id="worker-7", type="audit")


anyio.run(main)
"""


async def test_a_publisher_in_another_process_reaches_both_nodes(
    redis_server: RedisServer, make_backend: Callable[..., RedisBackend]
) -> None:
    async with (
        ConnectionManager(make_backend()) as node_a,
        ConnectionManager(make_backend()) as node_b,
    ):
        on_a, on_b = MemoryTransport(), MemoryBatchTransport()
        await node_a.connect(on_a, "alice", "jobs")
        await node_b.connect(on_b, "bob", "jobs")
        with anyio.fail_after(30):  # a hang guard: a Python process starts in about a second
            worker = await anyio.run_process([sys.executable, "-c", WORKER, redis_server.url])
            printed = worker.stdout.decode().splitlines()
            assert len(printed) == 3
            for transport in (on_a, on_b):
                await transport.wait_until(
                    lambda t: any(e["type"] == "audit" for e in t.envelopes())
                )
        for transport in (on_a, on_b):
            published = [f for f in transport.texts if '"job"' in f]
            assert published == printed  # the very text the worker's publish returned
            for frame in published:
                assert json.loads(frame)["client_id"] is None
            [audit] = [e for e in transport.envelopes() if e["type"] == "audit"]
            assert audit["client_id"] == "worker-7"
            seqs = [e["seq"] for e in transport.envelopes()]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)
