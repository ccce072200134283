"""Two chat-app processes on one real redis-server, driven by ``websockets`` clients on each.

What a deployment of N nodes behind a load balancer (no sticky sessions) relies on: one
order for every receiver on every node, resume through another node, presence across nodes,
and a Redis outage that degrades the nodes without closing their connections or losing a
message silently.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.backends.redis.redis_helpers import RedisServer, eventually
from tests.chat_app.frames import next_frame, until_personal_ack

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]

HISTORY = 50
Nodes = tuple["ChatServer", "ChatServer"]


def _start_redis() -> RedisServer:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    server = RedisServer(executable)
    server.start()
    return server


NODE_ARGS = ("--history", str(HISTORY), "--rate-limit", "0")


def _start_nodes(
    start_server: StartServer,
    redis: RedisServer,
    args_a: tuple[str, ...] = NODE_ARGS,
    args_b: tuple[str, ...] = NODE_ARGS,
) -> Nodes:
    # Heartbeats in tenths of seconds so that presence resyncs quickly after an outage.
    url = f"{redis.url}?heartbeat=0.2&presence_ttl=2"
    # One node on each server: they share rooms through Redis whatever serves them.
    return (
        start_server("--backend", url, *args_a),
        start_server("--backend", url, *args_b, kind="websockets"),
    )


@contextmanager
def _own_redis(
    start_server: StartServer,
    args_a: tuple[str, ...] = NODE_ARGS,
    args_b: tuple[str, ...] = NODE_ARGS,
) -> Iterator[tuple[RedisServer, ChatServer, ChatServer]]:
    """A redis-server and two nodes of the test's own (uvicorn and websockets), for tests
    that break Redis or need other flags; afterwards both logs are free of tracebacks."""
    redis = _start_redis()
    try:
        pair = _start_nodes(start_server, redis, args_a, args_b)
        try:
            yield redis, *pair
        finally:
            for node in pair:
                node.stop()
        _assert_no_traceback(*pair)
    finally:
        redis.kill()


def _assert_no_traceback(*nodes: ChatServer) -> None:
    for node in nodes:
        assert "Traceback" not in node.stderr(), node.stderr()


@pytest.fixture(scope="module")
def nodes(start_server: StartServer) -> Iterator[Nodes]:
    """Two nodes on one Redis (uvicorn and websockets), shared by the tests that do not break
    Redis."""
    redis = _start_redis()
    try:
        pair = _start_nodes(start_server, redis)
        yield pair
        for node in pair:
            node.stop()
        _assert_no_traceback(*pair)  # shutting down included
    finally:
        redis.kill()


@asynccontextmanager
async def client(
    node: ChatServer,
    client_id: str,
    room: str,
    since: int | None = None,
    epoch: str | None = None,
) -> AsyncIterator[ClientConnection]:
    url = f"{node.ws_url}/ws/{client_id}?room={room}"
    if since is not None:
        url += f"&since={since}"
    if epoch is not None:
        url += f"&epoch={epoch}"
    async with connect(url) as ws:
        yield ws


async def recv(ws: ClientConnection) -> Any:
    """The next frame, parsed (past the personal stream's ``joined``); fails the test rather
    than hang."""
    return await next_frame(ws)


async def recv_until(ws: ClientConnection, message: str) -> list[Any]:
    """Frames up to and including the chat message whose text is ``message``."""
    frames = []
    while True:
        frame = await recv(ws)
        frames.append(frame)
        if frame["type"] == "message" and frame["data"] == {"message": message}:
            return frames


async def connected(ws: ClientConnection, client_id: str) -> Any:
    """The client's own join, once its personal stream is joined too: from then on, an
    outage leaves the connection as it is (while that join is under way, it would get an
    ``unavailable`` error about the personal stream)."""
    frames = await until_personal_ack(ws)
    joins = [f for f in frames if f["type"] == "join" and f["client_id"] == client_id]
    return joins[0] if joins else await recv(ws)


async def send(ws: ClientConnection, message: str) -> None:
    await ws.send(json.dumps({"message": message}))


def room_info(node: ChatServer, room: str) -> Any:
    response = httpx.get(f"{node.url}/rooms/{room}", timeout=5)
    assert response.status_code == 200
    return response.json()


def metric(node: ChatServer, name: str) -> int:
    text = httpx.get(f"{node.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return int(match.group(1))


def health(node: ChatServer) -> tuple[int, Any]:
    response = httpx.get(f"{node.url}/healthz", timeout=5)
    return response.status_code, response.json()


async def test_concurrent_senders_on_both_nodes_share_one_order(nodes: Nodes) -> None:
    room, per_sender = "order", 25
    names = [("a0", 0), ("a1", 0), ("la", 0), ("b0", 1), ("b1", 1), ("lb", 1)]
    senders = ["a0", "a1", "b0", "b1"]
    async with AsyncExitStack() as stack:
        sockets: dict[str, ClientConnection] = {}
        frames: dict[str, list[Any]] = {}
        for name, node in names:
            ws = sockets[name] = await stack.enter_async_context(client(nodes[node], name, room))
            frames[name] = [await recv(ws)]  # its own join
            assert frames[name][0]["type"] == "join"

        async def collect(name: str) -> None:
            count = 0
            while count < len(senders) * per_sender:
                frame = await recv(sockets[name])
                frames[name].append(frame)
                count += frame["type"] == "message"

        async def send_all(name: str) -> None:
            for i in range(per_sender):
                await send(sockets[name], f"{name}-{i}")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as task_group:
                for name, _ in names:
                    task_group.start_soon(collect, name)
                for name in senders:
                    task_group.start_soon(send_all, name)

    reference = [f for f in frames["la"] if f["type"] == "message"]
    for name, received in frames.items():
        seqs = [frame["seq"] for frame in received]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{name}: gap in {seqs}"
        assert [f for f in received if f["type"] == "message"] == reference, name
    assert [f["seq"] for f in reference] == list(
        range(reference[0]["seq"], reference[0]["seq"] + len(reference))
    )
    for sender in senders:
        texts = [f["data"]["message"] for f in reference if f["client_id"] == sender]
        assert texts == [f"{sender}-{i}" for i in range(per_sender)]
    _assert_no_traceback(*nodes)


async def test_resume_through_the_other_node(nodes: Nodes) -> None:
    node_a, node_b = nodes
    room = "resume"
    async with client(node_b, "yan", room) as yan:
        assert (await recv(yan))["type"] == "join"
        async with client(node_a, "xia", room) as xia:
            assert (await recv(xia))["client_id"] == "xia"
            assert (await recv(yan))["client_id"] == "xia"
            await send(yan, "m0")
            last_seen = (await recv_until(xia, "m0"))[-1]["seq"]
            await recv_until(yan, "m0")
        missed = [await recv(yan)]  # xia's leave
        assert (missed[0]["type"], missed[0]["client_id"]) == ("leave", "xia")
        for i in range(1, 5):
            await send(yan, f"m{i}")
            missed += await recv_until(yan, f"m{i}")
        async with client(node_b, "xia", room, since=last_seen) as xia:
            join = await recv(yan)
            assert (join["type"], join["client_id"]) == ("join", "xia")
            replay = [await recv(xia) for _ in range(len(missed) + 1)]
            assert replay == [*missed, join]
            assert [f["seq"] for f in replay] == list(range(last_seen + 1, join["seq"] + 1))
            await send(yan, "live")
            assert await recv_until(xia, "live") == await recv_until(yan, "live")
    _assert_no_traceback(*nodes)


async def test_presence_across_nodes(nodes: Nodes) -> None:
    node_a, node_b = nodes
    room = "presence"
    async with client(node_a, "pia", room) as pia:
        await recv(pia)
        async with client(node_b, "quin", room) as quin:
            await recv(quin)
            assert (await recv(pia))["client_id"] == "quin"  # a join seen across nodes
            for node in nodes:
                assert room_info(node, room)["online"] == ["pia", "quin"]
            # A second tab of quin on the other node: presence is per client id, no join.
            async with client(node_a, "quin", room) as quin_tab:
                await send(quin_tab, "from the tab")
                for ws in (pia, quin, quin_tab):
                    frames = await recv_until(ws, "from the tab")
                    assert [f["type"] for f in frames] == ["message"]
                for node in nodes:
                    assert room_info(node, room)["online"] == ["pia", "quin"]
            # Closing the tab leaves quin online on node B: no leave. Once node A counts only
            # pia's connection, it has handled the tab's departure, so a leave would come
            # before this message.
            with anyio.fail_after(10):
                await eventually(lambda: metric(node_a, "chat_connections") == 1)
            await send(pia, "tab closed")
            frames = await recv_until(quin, "tab closed")
            assert [f["type"] for f in frames] == ["message"]
            await recv_until(pia, "tab closed")
        leave = await recv(pia)  # a leave seen across nodes
        assert (leave["type"], leave["client_id"]) == ("leave", "quin")
        for node in nodes:
            assert room_info(node, room)["online"] == ["pia"]
    with anyio.fail_after(10):
        await eventually(lambda: all(room_info(n, room)["online"] == [] for n in nodes))
    _assert_no_traceback(*nodes)


async def test_redis_killed_and_restarted_empty(start_server: StartServer) -> None:
    with _own_redis(start_server) as (redis, node_a, node_b):
        await _outage_and_recovery(redis, node_a, node_b, "fault")
        _assert_no_traceback(node_a, node_b)


async def _refused(node: ChatServer, client_id: str, room: str, since: int | None = None) -> None:
    """A connect while Redis is down: accepted, then closed with 1011."""
    async with client(node, client_id, room, since) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011


async def _outage_and_recovery(
    redis: RedisServer, node_a: ChatServer, node_b: ChatServer, room: str
) -> None:
    async with AsyncExitStack() as stack:
        ann = await stack.enter_async_context(client(node_a, "ann", room))
        assert (await connected(ann, "ann"))["client_id"] == "ann"
        ben = await stack.enter_async_context(client(node_b, "ben", room))
        assert (await connected(ben, "ben"))["client_id"] == "ben"
        assert (await recv(ann))["client_id"] == "ben"
        await send(ann, "before")
        before = (await recv_until(ben, "before"))[-1]
        old_seq, old_epoch = before["seq"], before["epoch"]
        await recv_until(ann, "before")
        # Both have it from Redis, maybe before node_a's publish has had Redis's reply: a
        # kill then loses the reply, and "before" is reported unavailable too, although it
        # was delivered (the backend's documented worst case). Kill once it has the reply.
        with anyio.fail_after(10):
            await eventually(lambda: metric(node_a, "chat_messages_published_total") == 1)

        redis.kill()
        await send(ann, "during")
        error = await recv(ann)
        assert error["type"] == "error"
        assert error["data"]["code"] == "unavailable"
        with anyio.fail_after(10):
            await eventually(lambda: health(node_a)[0] == 503 and health(node_b)[0] == 503)
        for node in (node_a, node_b):
            body = health(node)[1]
            assert body["status"] == "degraded"
            assert body["backend"]["connected"] is False
            assert metric(node, "chat_backend_connected") == 0
        assert metric(node_a, "chat_backend_publish_failures_total") >= 1
        assert metric(node_a, 'chat_errors_total{code="unavailable"}') == 1
        assert httpx.get(f"{node_b.url}/rooms/{room}", timeout=5).status_code == 503
        await _refused(node_b, "cat", room)  # a room the node reads: presence fails
        await _refused(node_a, "cat", "elsewhere")  # a new room: subscribe fails
        await _refused(node_a, "cat", room, since=old_seq)  # resume: history fails
        assert metric(node_a, 'chat_connections_refused_total{reason="unavailable"}') == 2
        # The nodes kept their local connections open through the outage.
        for ws in (ann, ben):
            with anyio.fail_after(10):
                await ws.ping()

        await anyio.to_thread.run_sync(redis.start)
        with anyio.fail_after(15):
            await eventually(lambda: health(node_a)[0] == 200 and health(node_b)[0] == 200)
        await send(ben, "after")
        after_ann = await recv_until(ann, "after")
        after_ben = await recv_until(ben, "after")
        # Both are told the stream was lost, with its new epoch, before anything of the new
        # stream, then read the new stream from its start: the same frames, gap-free.
        for frames in (after_ann, after_ben):
            lost = frames[0]
            assert lost["type"] == "history_lost"
            assert lost["data"]["since"] == old_seq
            new_epoch = lost["data"]["epoch"]
            assert new_epoch != old_epoch
            seqs = [f["seq"] for f in frames[1:]]
            assert seqs == list(
                range(lost["data"]["first_seq"], lost["data"]["first_seq"] + len(seqs))
            )
            assert {f["epoch"] for f in frames[1:]} == {new_epoch}
        assert after_ann[1:] == after_ben[1:]
        for node in (node_a, node_b):
            assert health(node)[1]["status"] == "ok"
            assert metric(node, "chat_backend_connected") == 1
            assert metric(node, "chat_backend_reconnects_total") == 1
            assert metric(node, "chat_backend_data_losses_total") == 1

        async with client(node_b, "cat", room, since=old_seq, epoch=old_epoch) as cat:
            lost = await recv(cat)
            assert lost["type"] == "history_lost"
            assert lost["data"]["since"] == old_seq
            assert lost["data"]["epoch"] == new_epoch
            join = await recv(cat)
            assert (join["type"], join["client_id"], join["epoch"]) == ("join", "cat", new_epoch)
        with anyio.fail_after(10):
            await eventually(lambda: sorted(room_info(node_a, room)["online"]) == ["ann", "ben"])
    assert "Redis unreachable" in node_a.stderr()


async def test_redis_refusing_writes(start_server: StartServer, server_kind: str) -> None:
    """Redis up but answering errors (out of memory): the same answers as an outage."""
    redis = _start_redis()
    admin = Redis.from_url(redis.url)
    try:
        node = start_server("--backend", redis.url, "--rate-limit", "0", kind=server_kind)
        try:
            async with client(node, "ann", "full") as ann:
                await connected(ann, "ann")
                await admin.config_set("maxmemory", 1)
                await send(ann, "no room for this")
                error = await recv(ann)
                assert (error["type"], error["data"]["code"]) == ("error", "unavailable")
                # A join and a direct message are refused alike; the connection stays.
                await ann.send(json.dumps({"join": "elsewhere"}))
                error = await recv(ann)
                assert (error["room"], error["data"]["code"]) == ("elsewhere", "unavailable")
                await ann.send(json.dumps({"to": "bob", "message": "no room either"}))
                error = await recv(ann)
                assert (error["room"], error["data"]["code"]) == ("@ann", "unavailable")
                await _refused(node, "bob", "full")  # presence refused
                await _refused(node, "bob", "other")  # subscribe refused
                assert httpx.get(f"{node.url}/rooms/full", timeout=5).status_code == 503
                # /healthz is 503 exactly when the backend says it is not ok (the Redis
                # backend reports refused writes as "degraded").
                status, body = health(node)
                assert (status == 503) == (body["backend"]["status"] != "ok"), body
                await admin.config_set("maxmemory", 0)
                await send(ann, "room again")
                assert [f["type"] for f in await recv_until(ann, "room again")] == ["message"]
                await ann.send(json.dumps({"join": "elsewhere"}))  # not half joined before
                assert (await recv(ann))["type"] == "joined"
            _assert_no_traceback(node)
        finally:
            node.stop()
    finally:
        await admin.aclose()
        redis.kill()
    _assert_no_traceback(node)


def _app_warnings(node: ChatServer) -> list[str]:
    return [line for line in node.stderr().splitlines() if " WARNING examples.chat_app: " in line]


async def test_one_warning_per_outage_and_healthz_follows_the_backend(
    start_server: StartServer, server_kind: str
) -> None:
    """While Redis is down, every failed send, connect and room read is answered (and
    /healthz is 503), but the app logs one warning for the outage, not one per failure;
    /healthz is 200 again and the log says so once Redis is back."""
    redis = _start_redis()
    try:
        url = f"{redis.url}?heartbeat=0.2&presence_ttl=2"
        node = start_server("--backend", url, kind=server_kind)
        try:
            async with client(node, "ann", "quiet") as ann:
                await connected(ann, "ann")
                assert health(node)[0] == 200
                redis.kill()
                for n in range(5):
                    await send(ann, f"during {n}")
                    error = await recv(ann)
                    assert (error["type"], error["data"]["code"]) == ("error", "unavailable")
                for _ in range(3):
                    response = httpx.get(f"{node.url}/rooms/quiet", timeout=5)
                    assert response.status_code == 503
                await _refused(node, "bob", "quiet")
                with anyio.fail_after(10):
                    await eventually(lambda: health(node)[0] == 503)
                assert health(node)[1]["status"] == "degraded"
                warnings = _app_warnings(node)
                assert len(warnings) == 1, warnings
                assert "backend unavailable" in warnings[0]

                await anyio.to_thread.run_sync(redis.start)
                with anyio.fail_after(15):
                    await eventually(lambda: health(node)[0] == 200)
                await send(ann, "after")
                await recv_until(ann, "after")
            assert len(_app_warnings(node)) == 1
            assert "INFO examples.chat_app: backend available again" in node.stderr()
            _assert_no_traceback(node)
        finally:
            node.stop()
    finally:
        redis.kill()


async def test_a_client_ids_rate_limit_holds_across_tabs_on_both_nodes(
    start_server: StartServer,
) -> None:
    """One client id with a tab on each node sends as fast as it can: the two nodes share one
    bucket through Redis, so together they let through what one bucket allows (burst 2 plus
    1 per second of the test), where separate buckets would let through twice that."""
    args = ("--rate-limit", "1", "--ip-rate-limit", "0")
    with _own_redis(start_server, args, args) as (_, node_a, node_b):
        async with client(node_a, "same", "rated-a") as a, client(node_b, "same", "rated-b") as b:
            await recv(a)
            await recv(b)
            started = time.monotonic()
            for n in range(10):
                await send(a, f"a{n}")
                await send(b, f"b{n}")
            accepted = 0
            for ws in (a, b):
                for _ in range(10):
                    frame = await recv(ws)
                    if frame["type"] == "message":
                        accepted += 1
                    else:
                        assert frame["data"]["code"] == "rate_limited", frame
            elapsed = time.monotonic() - started
        assert 2 <= accepted <= 2 + math.ceil(elapsed) + 1, (accepted, elapsed)


async def test_an_http_publish_on_one_node_reaches_clients_on_both(
    start_server: StartServer,
) -> None:
    key = "node-key-0123456789abcdef"
    with _own_redis(start_server, ("--api-key", key)) as (_, node_a, node_b):
        async with client(node_a, "ann", "alerts") as ann:
            # ann's join is published once her handshake is done: wait for it before ben
            # connects, or his join may take the earlier seq and precede her arrival.
            await recv(ann)
            async with client(node_b, "ben", "alerts") as ben:
                await recv(ben)
                assert (await recv(ann))["client_id"] == "ben"
                response = httpx.post(
                    f"{node_a.url}/api/rooms/alerts/messages",
                    json={"message": "disk full"},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=5,
                )
                assert response.status_code == 202
                envelope = response.json()
                assert envelope["client_id"] is None
                assert await recv(ann) == envelope
                assert await recv(ben) == envelope


async def recv_direct(ws: ClientConnection, message: str) -> list[Any]:
    """Frames up to and including the direct message whose text is ``message``."""
    frames = []
    while True:
        frame = await recv(ws)
        frames.append(frame)
        if frame["type"] == "direct" and frame["data"]["data"] == {"message": message}:
            return frames


async def test_rooms_joined_and_direct_messages_cross_nodes(nodes: Nodes) -> None:
    """A room joined on one node takes messages sent on the other, and a direct message sent
    on one node reaches the recipient on the other, through its personal stream."""
    async with (
        client(nodes[0], "roamer", "cross-a") as roamer,
        client(nodes[1], "local", "cross-b") as local,
    ):
        for ws in (roamer, local):
            await until_personal_ack(ws)  # from here, direct messages reach it
        await roamer.send(json.dumps({"join": "cross-b"}))
        while (frame := await recv(roamer))["type"] != "joined":
            pass
        assert frame["room"] == "cross-b"
        await send(local, "from node b")
        got = (await recv_until(roamer, "from node b"))[-1]
        assert (got["room"], got["client_id"]) == ("cross-b", "local")
        await roamer.send(json.dumps({"to": "local", "message": "psst"}))
        direct = (await recv_direct(local, "psst"))[-1]
        assert (direct["room"], direct["client_id"]) == ("@local", "roamer")


async def test_a_direct_message_reaches_the_senders_other_tabs(nodes: Nodes) -> None:
    """The sender's copy (same id, in its own personal stream) reaches its tab on the other
    node."""
    async with (
        client(nodes[0], "tabbed", "tabs-a") as first,
        client(nodes[1], "tabbed", "tabs-b") as second,
        client(nodes[1], "reader", "tabs-c") as reader,
    ):
        for ws in (first, second, reader):
            await until_personal_ack(ws)
        await first.send(json.dumps({"to": "reader", "message": "psst"}))
        await recv_direct(reader, "psst")
        await reader.send(json.dumps({"to": "tabbed", "message": "marker"}))
        # The marker was published in tabbed's stream after psst's copy, had it been.
        frames = await recv_direct(second, "marker")
        assert [f["data"]["data"] for f in frames if f["type"] == "direct"] == [
            {"message": "psst"},
            {"message": "marker"},
        ]


async def test_a_direct_message_reaches_both_tabs_on_both_nodes_once_and_no_one_else(
    nodes: Nodes,
) -> None:
    """bob has a tab on each node; alice (node a) sends him one message; carol (node b) is in
    the same room. Each of bob's tabs gets it exactly once, carol never does: each tab's next
    direct message is a marker published after it, in its own stream."""
    async with (
        client(nodes[0], "dm-alice", "dm-room") as alice,
        client(nodes[0], "dm-bob", "dm-room") as bob_a,
        client(nodes[1], "dm-bob", "dm-room") as bob_b,
        client(nodes[1], "dm-carol", "dm-room") as carol,
    ):
        for ws in (alice, bob_a, bob_b, carol):
            await until_personal_ack(ws)
        await alice.send(json.dumps({"to": "dm-bob", "message": "for bob only"}))
        for ws in (bob_a, bob_b):
            await recv_direct(ws, "for bob only")
        # Markers: a DM from carol to bob and to herself, published after alice's.
        for to in ("dm-bob", "dm-carol"):
            await carol.send(json.dumps({"to": to, "message": f"marker for {to}"}))
        for ws in (bob_a, bob_b):
            frames = await recv_direct(ws, "marker for dm-bob")
            assert [f for f in frames if f["type"] == "direct"][:-1] == []  # nothing twice
        frames = await recv_direct(carol, "marker for dm-carol")
        texts = [f["data"]["data"]["message"] for f in frames if f["type"] == "direct"]
        # carol sees her own two sent copies (her stream) and her marker, never bob's DM.
        assert "for bob only" not in texts
