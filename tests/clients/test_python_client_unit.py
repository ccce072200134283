"""wsbroadcast.client against a scripted server (websockets' asyncio server on 127.0.0.1).

The test plays the server frame by frame, so each rule of the client (resume, dedupe, gap,
history_lost, close codes) is checked on its own; tests/clients/test_scenarios.py runs the
shared scenarios against the real chat app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from tests.support import free_port
from wsbroadcast import Envelope
from wsbroadcast.client import (
    Client,
    ClientClosed,
    ClientEvent,
    ClientState,
    Disconnected,
    Gap,
    HistoryLost,
    NotConnected,
    Position,
    Subscribed,
    Unsubscribed,
    backoff_delay,
    connect,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """The scripted server is websockets' asyncio server: these tests run on asyncio."""
    return "asyncio"


class ScriptedServer:
    """Hands each accepted connection to the test, which plays the server's side."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[ServerConnection] = asyncio.Queue()
        self.refuse_with: int | None = None
        self.server: Server | None = None

    async def handler(self, ws: ServerConnection) -> None:
        await self.connections.put(ws)
        await ws.wait_closed()

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if self.refuse_with is not None:
            return ws.respond(self.refuse_with, "refused\n")
        return None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = next(iter(self.server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws/alice"

    async def next(self) -> ServerConnection:
        return await self.connections.get()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    async with serve(
        scripted.handler, "127.0.0.1", 0, process_request=scripted.process_request
    ) as running:
        scripted.server = running
        yield scripted


def query(ws: ServerConnection) -> dict[str, str]:
    assert ws.request is not None
    return dict(parse_qsl(urlsplit(ws.request.path).query))


_ids = iter(range(1, 1_000_000))


def envelope(room: str, seq: int, epoch: str, data: Any = None, kind: str = "message") -> str:
    if data is None:
        data = {"message": f"m{seq}"}
    return json.dumps(
        {
            "type": kind,
            "room": room,
            "seq": seq,
            "epoch": epoch,
            "id": f"{next(_ids):032x}",
            "client_id": "bob",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "data": data,
        }
    )


def fast(url: str, **kwargs: Any) -> Client:
    """A client that retries at once (no jitter), so tests wait on events, not time."""
    return connect(url, min_reconnect_delay=0.01, random=lambda: 0.0, **kwargs)


async def take(events: AsyncIterator[Envelope | ClientEvent], kind: type[Any]) -> Any:
    """The next item of type ``kind`` (others skipped)."""
    async for item in events:
        if isinstance(item, kind):
            return item
    raise AssertionError(f"no {kind.__name__}")


def test_backoff_is_full_jitter_under_a_cap() -> None:
    assert backoff_delay(0, 0.5, 20, lambda: 0.5) == 0.25
    assert backoff_delay(3, 0.5, 20, lambda: 0.5) == 2.0
    assert backoff_delay(50, 0.5, 20, lambda: 0.5) == 10.0


async def test_resume_every_room_no_loss_no_duplicate(server: ScriptedServer) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["chat:lobby", "second"], token="t") as client:
            events = client.events()
            first = await server.next()
            assert query(first) == {"room": "chat:lobby", "token": "t"}
            assert json.loads(await first.recv()) == {"join": "second"}
            await first.send(
                json.dumps({"type": "joined", "room": "@alice", "data": {"seq": 2, "epoch": "d"}})
            )
            await first.send(envelope("chat:lobby", 1, "e"))
            await first.send(envelope("chat:lobby", 2, "e"))
            await first.send(
                json.dumps({"type": "joined", "room": "second", "data": {"seq": 5, "epoch": "s"}})
            )
            await first.close(1012, "service restart")
            closed = await take(events, Disconnected)
            assert (closed.code, closed.will_retry) == (1012, True)
            second = await server.next()
            assert query(second) == {
                "room": "chat:lobby",
                "since": "2",
                "epoch": "e",
                "dm_since": "2",
                "dm_epoch": "d",
                "token": "t",
            }
            assert json.loads(await second.recv()) == {"join": "second", "since": 5, "epoch": "s"}
            await second.send(envelope("chat:lobby", 2, "e"))  # replayed: a duplicate
            await second.send(envelope("chat:lobby", 3, "e"))
            await second.send(envelope("second", 6, "s"))
            await second.send(
                json.dumps({"type": "joined", "room": "second", "data": {"seq": 6, "epoch": "s"}})
            )
            subscribed = await take(events, Subscribed)  # the URL room's, at open
            assert subscribed.room == "chat:lobby"
            got = []
            async for item in events:
                if isinstance(item, Envelope):
                    got.append((item.room, item.seq))
                if isinstance(item, Subscribed) and item.room == "second":
                    assert (item.resumed, item.recovered) == (True, True)
                    break
            assert got == [("chat:lobby", 3), ("second", 6)]
            assert client.rooms() == {
                "chat:lobby": Position(3, "e"),
                "second": Position(6, "s"),
                "@alice": Position(2, "d"),
            }


async def test_a_gap_resumes_from_the_last_seq(server: ScriptedServer) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby"]) as client:
            events = client.events()
            first = await server.next()
            for seq in (1, 2, 5):
                await first.send(envelope("lobby", seq, "e"))
            gap = await take(events, Gap)
            assert gap == Gap("lobby", 3, 5)
            closed = await take(events, Disconnected)
            assert (closed.code, closed.reason, closed.delay) == (4000, "gap", 0.0)
            second = await server.next()
            assert query(second) == {"room": "lobby", "since": "2", "epoch": "e"}
            for seq in (3, 4, 5):
                await second.send(envelope("lobby", seq, "e"))
            seqs = []
            async for item in client:
                seqs.append(item.seq)
                if item.seq == 5:
                    break
            assert seqs == [3, 4, 5]


async def test_history_lost_is_surfaced_and_the_stream_goes_on(server: ScriptedServer) -> None:
    with anyio.fail_after(10):
        rooms = {"lobby": Position(7, "old")}
        async with fast(server.url, rooms=rooms) as client:
            events = client.events()
            ws = await server.next()
            assert query(ws) == {"room": "lobby", "since": "7", "epoch": "old"}
            lost = {"since": 7, "epoch": "new", "first_seq": 1, "last_seq": 3}
            await ws.send(json.dumps({"type": "history_lost", "room": "lobby", "data": lost}))
            await ws.send(envelope("lobby", 4, "new"))
            assert await take(events, HistoryLost) == HistoryLost("lobby", 7, "new", 1, 3)
            assert (await take(events, Envelope)).seq == 4
            assert client.position("lobby") == Position(4, "new")


@pytest.mark.parametrize("code", [1008, 1009])
async def test_a_final_close_ends_iteration_with_client_closed(
    server: ScriptedServer, code: int
) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby"]) as client:
            ws = await server.next()
            await ws.close(code, "go away")
            with pytest.raises(ClientClosed) as raised:
                async for _ in client:
                    pass
            assert (raised.value.code, raised.value.reason) == (code, "go away")


async def test_a_refused_handshake_is_final(server: ScriptedServer) -> None:
    server.refuse_with = 403
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby"]) as client:
            with pytest.raises(ClientClosed, match="HTTP 403"):
                async for _ in client:
                    pass


@pytest.mark.parametrize("code", [1001, 1011, 1012, 1013, 4008])
async def test_retried_close_codes(server: ScriptedServer, code: int) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby"]) as client:
            events = client.events()
            first = await server.next()
            await first.send(envelope("lobby", 1, "e"))
            await first.close(code)
            assert (await take(events, Disconnected)).will_retry
            second = await server.next()
            assert query(second)["since"] == "1"


async def test_subscribe_while_connected_and_a_refused_join(server: ScriptedServer) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby"]) as client:
            events = client.events()
            ws = await server.next()
            await take(events, Subscribed)
            await client.subscribe("staff")
            assert json.loads(await ws.recv()) == {"join": "staff"}
            error = {"code": "forbidden_room", "detail": "no"}
            await ws.send(json.dumps({"type": "error", "room": "staff", "data": error}))
            assert await take(events, Unsubscribed) == Unsubscribed("staff", "forbidden_room", "no")
            await client.unsubscribe("lobby")
            assert json.loads(await ws.recv()) == {"leave": "lobby"}
            await ws.send(envelope("lobby", 1, "e"))  # queued before the leave: dropped
            await ws.send(json.dumps({"type": "left", "room": "lobby", "data": None}))
            assert await take(events, Unsubscribed) == Unsubscribed("lobby", None, "unsubscribed")
            await client.publish("lobby", "hi")
            assert json.loads(await ws.recv()) == {"room": "lobby", "message": "hi"}


async def test_a_rate_limited_frame_may_have_been_a_join(server: ScriptedServer) -> None:
    """The rate-limit error names the connection's first room: every join still unanswered
    is sent again, one that was answered is not."""
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby", "news", "sport"]) as client:
            events = client.events()
            ws = await server.next()
            assert [json.loads(await ws.recv()) for _ in range(2)] == [
                {"join": "news"},
                {"join": "sport"},
            ]
            await ws.send(
                json.dumps({"type": "joined", "room": "news", "data": {"seq": 3, "epoch": "n"}})
            )
            limited = {
                "type": "error",
                "room": "lobby",
                "data": {"code": "rate_limited", "detail": "slow"},
            }
            await ws.send(json.dumps(limited))
            assert json.loads(await ws.recv()) == {"join": "sport"}
            await ws.send(
                json.dumps({"type": "joined", "room": "sport", "data": {"seq": 0, "epoch": ""}})
            )
            while (await take(events, Subscribed)).room != "sport":
                pass
            await ws.send(json.dumps(limited))
            await client.publish("lobby", "hi")  # nothing unanswered: no join before it
            assert json.loads(await ws.recv()) == {"room": "lobby", "message": "hi"}


async def test_an_unavailable_join_is_sent_again(server: ScriptedServer) -> None:
    with anyio.fail_after(10):
        async with fast(server.url, rooms=["lobby", "news"]):
            ws = await server.next()
            assert json.loads(await ws.recv()) == {"join": "news"}
            error = {"code": "unavailable", "detail": "backend down"}
            await ws.send(json.dumps({"type": "error", "room": "news", "data": error}))
            assert json.loads(await ws.recv()) == {"join": "news"}


async def test_while_not_connected_nothing_is_sent_and_subscriptions_wait() -> None:
    """Nothing listens: each attempt ends with 1006 and a retry; meanwhile rooms are recorded
    (or dropped) locally, the personal stream's resume point is set, and sends refuse."""
    url = f"ws://127.0.0.1:{free_port()}/ws/alice"
    with anyio.fail_after(10):
        async with fast(url, rooms=["lobby"]) as client:
            events = client.events()
            disconnected = await take(events, Disconnected)
            assert (disconnected.code, disconnected.will_retry) == (1006, True)
            assert client.state is not ClientState.CONNECTED
            assert client.personal_stream is None
            await client.subscribe("red", since=4, epoch="e")
            await client.subscribe("red", since=9)  # already subscribed: kept as it was
            await client.subscribe("@alice", since=3, epoch="d")
            await client.subscribe("@alice", since=7)  # a resume point is set once
            assert client.rooms() == {
                "lobby": Position(None, None),
                "red": Position(4, "e"),
                "@alice": Position(3, "d"),
            }
            assert client.personal_stream == "@alice"
            with pytest.raises(ValueError, match="the personal stream is @alice"):
                await client.subscribe("@bob")
            await client.unsubscribe("red")
            await client.unsubscribe("@alice")  # the personal stream cannot be left
            await client.unsubscribe("blue")  # never subscribed: nothing to do
            assert await take(events, Unsubscribed) == Unsubscribed("red", None, "unsubscribed")
            assert client.position("red") is None
            assert client.position("@alice") == Position(3, "d")
            for send in (client.publish("lobby", "hi"), client.send_direct("bob", "hi")):
                with pytest.raises(NotConnected, match="not connected"):
                    await send


async def test_a_url_that_is_not_a_websocket_url_is_final() -> None:
    with anyio.fail_after(10):
        async with fast("http://127.0.0.1/ws/alice", rooms=["lobby"]) as client:
            with pytest.raises(ClientClosed) as raised:
                async for _ in client:
                    pass
    assert raised.value.code == 1006
