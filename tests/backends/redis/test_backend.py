"""RedisBackend against a real redis-server: order, history, presence, across nodes."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import pytest
from redis.asyncio import Redis

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, Recorder, RedisServer, eventually
from wsbroadcast import Envelope, backend_from_url
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.exceptions import InvalidBackendURL

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

Make = Callable[..., RedisBackend]


async def test_publish_assigns_seq_and_final_text(make_backend: Make) -> None:
    async with make_backend() as a, make_backend() as b:
        first = await a.publish("lobby", "message", "alice", {"n": 1, "s": 'é"x'})
        second = await b.publish("lobby", "join", "bob")
        assert (first.seq, second.seq) == (1, 2)
        for envelope in (first, second):
            assert envelope.text == envelope.model_dump_json()
            assert Envelope.from_text(envelope.text) == envelope
        history = await b.history("lobby", 0)
        assert history.complete
        assert [e.text for e in history.envelopes] == [first.text, second.text]


async def test_concurrent_publishers_give_one_order_with_sender_fifo(make_backend: Make) -> None:
    per_sender = 15
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(make_backend()) for _ in range(3)]
        recorders = [Recorder() for _ in nodes]
        for node, recorder in zip(nodes, recorders, strict=True):
            await node.subscribe("room", recorder)

        async def sender(node: RedisBackend, name: str) -> None:
            for i in range(per_sender):
                await node.publish("room", "message", name, i)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n, node in enumerate(nodes):
                    for s in range(3):
                        tg.start_soon(sender, node, f"s{n}-{s}")
            total = 3 * 3 * per_sender
            for recorder in recorders:
                await recorder.wait_for(total)
        reference = [e.id for e in recorders[0].envelopes]
        for recorder in recorders:
            assert recorder.seqs == list(range(1, total + 1))
            assert [e.id for e in recorder.envelopes] == reference
        by_sender: dict[str | None, list[object]] = {}
        for envelope in recorders[0].envelopes:
            by_sender.setdefault(envelope.client_id, []).append(envelope.data)
        assert all(data == list(range(per_sender)) for data in by_sender.values())
        assert len(by_sender) == 9


async def test_listener_gets_only_what_is_published_after_subscribe(make_backend: Make) -> None:
    async with make_backend() as a, make_backend() as b:
        await a.publish("r", "message", "x", 1)
        early = Recorder()
        await b.subscribe("r", early)
        await a.publish("r", "message", "x", 2)
        with anyio.fail_after(5):
            await early.wait_for(1)
        late = Recorder()
        await b.subscribe("r", late)
        await a.publish("r", "message", "x", 3)
        with anyio.fail_after(5):
            await late.wait_for(1)
            await early.wait_for(2)
        assert early.seqs == [2, 3]
        assert late.seqs == [3]


async def test_closed_subscription_stops_and_costs_nothing(make_backend: Make) -> None:
    async with make_backend() as a:
        recorder = Recorder()
        subscription = await a.subscribe("r", recorder)
        assert a.health().rooms == 1
        await subscription.aclose()
        await subscription.aclose()
        assert a.health().rooms == 0
        other = Recorder()
        await a.subscribe("s", other)
        await a.publish("r", "message", "x")
        await a.publish("s", "message", "x")
        with anyio.fail_after(5):
            await other.wait_for(1)
        assert recorder.envelopes == []


async def test_history_resumes_on_another_node(make_backend: Make) -> None:
    async with make_backend() as a, make_backend() as b:
        published = [await a.publish("r", "message", "alice", i) for i in range(5)]
        history = await b.history("r", 2)
        assert history.complete
        assert (history.last_seq, history.first_seq) == (5, 1)
        assert [e.text for e in history.envelopes] == [e.text for e in published[2:]]
        assert (await b.history("r", 5)).complete
        assert (await b.history("r", 5)).envelopes == ()
        ahead = await b.history("r", 6)
        assert not ahead.complete
        assert ahead.envelopes == ()
        never = await b.history("nothing-here", 0)
        assert (never.complete, never.last_seq, never.first_seq) == (True, 0, 1)
        assert not (await b.history("nothing-here", 1)).complete


async def test_trimmed_history_is_all_or_nothing(make_backend: Make) -> None:
    async with make_backend(history_size=3, exact_trim=True) as a:
        for i in range(6):
            await a.publish("r", "message", "alice", i)
        lost = await a.history("r", 1)
        assert not lost.complete
        assert lost.envelopes == ()
        assert (lost.first_seq, lost.last_seq) == (4, 6)
        kept = await a.history("r", 3)
        assert kept.complete
        assert [e.seq for e in kept.envelopes] == [4, 5, 6]


async def test_presence_spans_nodes(make_backend: Make) -> None:
    async with make_backend() as a, make_backend() as b:
        assert await a.add_presence("r", "alice")
        assert not await b.add_presence("r", "alice")
        assert not await a.add_presence("r", "alice")
        assert await b.add_presence("r", "bob")
        assert await a.presence("r") == ["alice", "bob"]
        assert not await a.remove_presence("r", "alice")
        assert not await a.remove_presence("r", "alice")
        assert not await a.remove_presence("r", "alice")  # none left on a: no change
        assert await b.remove_presence("r", "alice")
        assert await b.presence("r") == ["bob"]
        assert await b.remove_presence("r", "bob")
        assert await a.presence("r") == []
        assert await a.presence("elsewhere") == []


async def test_dead_node_leaves_presence_and_its_leaves_are_announced(
    make_backend: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_backend() as a:
        recorder = Recorder()
        await a.subscribe("r", recorder)
        assert await a.add_presence("r", "alice")
        async with make_backend() as b:
            assert await b.add_presence("r", "bob")
            assert not await b.add_presence("r", "alice")
            assert await a.presence("r") == ["alice", "bob"]

            async def crash() -> None:
                """Leave nothing behind on the way out, like a killed process."""

            monkeypatch.setattr(b, "_leave_cluster", crash)
        with anyio.fail_after(5):
            # presence_ttl is 0.5 s: bob disappears with b's heartbeat ...
            await eventually(lambda: a.health().reaped_nodes == 1)
            # ... and a announces his leave; alice is still connected on a.
            await recorder.wait_for(1)
        assert [(e.type, e.client_id) for e in recorder.envelopes] == [("leave", "bob")]
        assert await a.presence("r") == ["alice"]
        assert await a.remove_presence("r", "alice")


async def test_presence_of_silent_node_expires_within_ttl(
    make_backend: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_backend(presence_ttl=0.3) as a, make_backend(presence_ttl=0.3) as b:
        assert await b.add_presence("r", "bob")
        assert await a.presence("r") == ["bob"]

        async def frozen() -> None:
            await anyio.sleep_forever()

        # b still runs but stops beating, as if it hung or lost its network.
        monkeypatch.setattr(b, "_heartbeat", frozen)
        with anyio.fail_after(3):
            start = anyio.current_time()
            while await a.presence("r"):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert anyio.current_time() - start < 0.3 + 0.1 + 0.2
        # a new connection of bob elsewhere is his first live one again
        assert await a.add_presence("r", "bob")


async def test_from_url_options(redis_server: RedisServer) -> None:
    backend = backend_from_url(
        f"{redis_server.url}?history=7&prefix=app1:&presence_ttl=3&heartbeat=1&socket_keepalive=1"
    )
    assert isinstance(backend, RedisBackend)
    assert (backend.history_size, backend.prefix) == (7, "app1:")
    assert (backend.presence_ttl, backend.heartbeat_interval) == (3.0, 1.0)
    assert backend.url == f"{redis_server.url}?socket_keepalive=1"
    async with backend:
        await backend.publish("r", "message", "x")
        assert (await backend.history("r", 0)).last_seq == 1
    with pytest.raises(InvalidBackendURL):
        backend_from_url(f"{redis_server.url}?history=lots")
    with pytest.raises(InvalidBackendURL):
        backend_from_url(f"{redis_server.url}?history=0")
    with pytest.raises(InvalidBackendURL):
        RedisBackend(redis_server.url, heartbeat_interval=5, presence_ttl=5)


async def test_health_reports_ok_with_details(make_backend: Make) -> None:
    async with make_backend() as a:
        health = a.health()
        json.dumps(health.as_dict())
        assert health.status == "ok"
        assert health.connected is True
        assert health.reconnects == 0
        assert health.last_error is None


async def test_a_burst_larger_than_the_pool_waits_for_connections(make_backend: Make) -> None:
    # 60 concurrent presence updates and publishes through a pool of 2 connections: each
    # waits for a free connection instead of failing with "Too many connections".
    async with make_backend(max_connections=2) as node:
        async with anyio.create_task_group() as group:
            for n in range(30):
                group.start_soon(node.add_presence, "burst", f"c{n}")
                group.start_soon(node.publish, "burst", "message", f"c{n}", n)
        assert len(await node.presence("burst")) == 30
        history = await node.history("burst", 0)
        assert [e.seq for e in history.envelopes] == list(range(1, 31))
        assert node.health().status == "ok"


async def test_namespaced_names_round_trip(make_backend: Make, redis_server: RedisServer) -> None:
    """``: # @`` in rooms and client ids: publish, delivery, history and presence work, and the
    keys a room uses escape ``:`` (``%3A``), so a key still splits into its parts."""
    room = "chat:lobby"
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await b.subscribe(room, recorder)
        assert await a.add_presence(room, "alice@example.com")
        assert await b.add_presence(room, "user#42")
        sent = await a.publish(room, "orders.eu-1", "user#42", {"n": 1})
        with anyio.fail_after(5):
            [received] = await recorder.wait_for(1)
        assert received == sent
        assert (sent.room, sent.client_id, sent.type) == (room, "user#42", "orders.eu-1")
        history = await b.history(room, 0)
        assert [e.text for e in history.envelopes] == [sent.text]
        assert await a.presence(room) == ["alice@example.com", "user#42"]
        admin = Redis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = set(await admin.keys("wsbroadcast:room:*"))
            assert keys == {
                "wsbroadcast:room:chat%3Alobby:stream",
                "wsbroadcast:room:chat%3Alobby:log",
                "wsbroadcast:room:chat%3Alobby:members",
                "wsbroadcast:room:chat%3Alobby:client:alice@example.com",
                "wsbroadcast:room:chat%3Alobby:client:user#42",
                f"wsbroadcast:room:chat%3Alobby:receipt:{sent.id}",
            }
            # The heartbeat keeps the client hashes alive under their escaped keys.
            hashes = [key for key in keys if ":client:" in key]
            for key in hashes:
                await admin.pexpire(key, 100_000)
            with anyio.fail_after(5):
                while min([await admin.pttl(key) for key in hashes]) <= 100_000:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
        finally:
            await admin.aclose()
        assert await a.remove_presence(room, "alice@example.com")
        assert await a.presence(room) == ["user#42"]


async def test_colons_in_names_never_make_two_rooms_share_a_key(make_backend: Make) -> None:
    """Unescaped, room ``x`` with client ``y:log`` and room ``x:client:y`` would share the key
    ``room:x:client:y:log`` (a presence hash and a log)."""
    async with make_backend() as a:
        for client in ("y:log", "y:stream", "y:members"):
            assert await a.add_presence("x", client)
        sent = await a.publish("x:client:y", "message", "z", 1)
        assert sent.seq == 1
        assert await a.add_presence("x:client:y", "w")
        assert await a.presence("x") == ["y:log", "y:members", "y:stream"]
        assert await a.presence("x:client:y") == ["w"]
        assert [e.text for e in (await a.history("x:client:y", 0)).envelopes] == [sent.text]
        assert (await a.history("x", 0)).envelopes == ()
