"""The chat app's protocol end to end: ``python -m examples.chat_app`` in a subprocess, real
WebSocket clients (the ``websockets`` library) over loopback; every test on both servers
(``--server uvicorn`` and ``--server websockets``)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from examples.chat_app.responses import CLIENT_JS
from tests.chat_app.frames import next_frame

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

MAX_TEXT = 100
MAX_BYTES = 4096
HISTORY = 20
ALLOWED = "http://allowed.example"

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture(scope="module")
def server(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server(
        "--max-text", str(MAX_TEXT),
        "--max-message-bytes", str(MAX_BYTES),
        "--history", str(HISTORY),
        "--rate-limit", "200",
        "--allowed-origin", ALLOWED,
        "--allowed-origin", "https://other.example:8443",
        kind=server_kind,
    )  # fmt: skip


@asynccontextmanager
async def client(
    server: ChatServer, client_id: str, room: str | None = None, **kwargs: Any
) -> AsyncIterator[ClientConnection]:
    query = []
    if room is not None:
        query.append(f"room={room}")
    if "since" in kwargs:
        query.append(f"since={kwargs.pop('since')}")
    if "epoch" in kwargs:
        query.append(f"epoch={kwargs.pop('epoch')}")
    url = f"{server.ws_url}/ws/{client_id}" + ("?" + "&".join(query) if query else "")
    async with connect(url, **kwargs) as ws:
        yield ws


async def recv(ws: ClientConnection) -> Any:
    """The next frame, parsed (past the personal stream's ``joined``); fails the test rather
    than hang."""
    return await next_frame(ws)


ENVELOPE_KEYS = ["type", "room", "seq", "epoch", "id", "client_id", "timestamp", "data"]


@pytest.mark.anyio
@asyncio_only
async def test_join_message_leave_and_envelope_shape(server: ChatServer) -> None:
    room = "shape"
    async with client(server, "alice", room) as alice:
        # No permessage-deflate: one frame's bytes serve every recipient (the fast path).
        assert alice.response is not None
        assert "Sec-WebSocket-Extensions" not in alice.response.headers
        own = await recv(alice)
        assert list(own) == ENVELOPE_KEYS
        assert (own["type"], own["room"], own["client_id"], own["data"]) == (
            "join", room, "alice", None
        )  # fmt: skip
        assert re.fullmatch(r"[0-9a-f]{32}", own["id"])
        assert own["timestamp"].endswith("+00:00")
        async with client(server, "bob", room) as bob:
            bob_join = await recv(bob)
            assert (bob_join["type"], bob_join["client_id"]) == ("join", "bob")
            assert await recv(alice) == bob_join
            assert bob_join["seq"] == own["seq"] + 1

            await alice.send(json.dumps({"message": "hello <b>bob</b>"}))
            message = await recv(alice)
            assert await recv(bob) == message
            assert list(message) == ENVELOPE_KEYS
            assert message["type"] == "message"
            assert message["client_id"] == "alice"
            assert message["data"] == {"message": "hello <b>bob</b>"}
            assert message["seq"] == bob_join["seq"] + 1

            body = httpx.get(f"{server.url}/rooms/{room}").json()
            assert body == {"room": room, "online": ["alice", "bob"], "seq": message["seq"]}
        leave = await recv(alice)
        assert (leave["type"], leave["client_id"], leave["seq"]) == (
            "leave", "bob", message["seq"] + 1
        )  # fmt: skip
    assert httpx.get(f"{server.url}/rooms/{room}").json()["online"] == []


@pytest.mark.anyio
@asyncio_only
async def test_room_defaults_to_lobby(server: ChatServer) -> None:
    async with client(server, "default-room") as ws:
        assert (await recv(ws))["room"] == "lobby"


def test_http_routes(server: ChatServer) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="messages"' in page.text
    assert 'id="message"' in page.text
    assert "script-src 'self' 'sha256-" in page.headers["content-security-policy"]
    health = httpx.get(f"{server.url}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        "chat_connections", "chat_rooms", "chat_messages_published_total",
        "chat_deliveries_total", "chat_drops_total", "chat_slow_consumer_disconnects_total",
        "chat_departures_lost_total", "chat_close_timeouts_total",
        'chat_errors_total{code="invalid_json"}',
    ):  # fmt: skip
        assert re.search(rf"^{re.escape(name)} \d+$", metrics.text, re.MULTILINE), name
    assert httpx.get(f"{server.url}/rooms/bad%20room").status_code == 400
    for nowhere in ("/nowhere", "/rooms/a/b", "/rooms/", "/healthz/x"):
        assert httpx.get(f"{server.url}{nowhere}").status_code == 404, nowhere
    for route in ("/", "/healthz", "/rooms/lobby"):
        assert httpx.post(f"{server.url}{route}").status_code == 405, route
    assert httpx.get(f"{server.url}/rooms/never-used").json() == {
        "room": "never-used", "online": [], "seq": 0
    }  # fmt: skip


def test_the_js_client_is_served_for_the_page(server: ChatServer) -> None:
    """``GET /wsbroadcast-client.js`` is clients/js/src/wsbroadcast-client.js itself, as
    JavaScript (module scripts need a JavaScript MIME type), and the page's CSP allows it by
    ``'self'`` and nothing else new."""
    script = httpx.get(f"{server.url}/wsbroadcast-client.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-content-type-options"] == "nosniff"
    assert script.content == CLIENT_JS.read_bytes()
    assert "export class WsBroadcastClient" in script.text
    csp = httpx.get(f"{server.url}/").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert re.fullmatch(r"'self'( 'sha256-[A-Za-z0-9+/=]{44}')+", directives["script-src"]), csp
    assert directives["connect-src"] == "'self'"
    assert directives["default-src"] == "'none'"
    assert "unsafe" not in csp
    assert httpx.post(f"{server.url}/wsbroadcast-client.js").status_code == 405
    assert httpx.get(f"{server.url}/wsbroadcast-client.js/x").status_code == 404


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("not json", "invalid_json"),
    ('{"message": "unterminated', "invalid_json"),
    ("[" * 2000 + "]" * 2000, "invalid_json"),  # nested too deeply to parse
    ("[[[1]]]", "not_an_object"),
    ("[1, 2]", "not_an_object"),
    ('"just a string"', "not_an_object"),
    ("42", "not_an_object"),
    ("null", "not_an_object"),
    ("{}", "missing_message"),
    ('{"text": "hi"}', "missing_message"),
    ('{"message": 42}', "message_not_a_string"),
    ('{"message": null}', "message_not_a_string"),
    ('{"message": ["hi"]}', "message_not_a_string"),
    ('{"message": {"html": "<b>"}}', "message_not_a_string"),
    ('{"message": ""}', "empty_message"),
    ('{"message": "   \\n "}', "empty_message"),
    (json.dumps({"message": "x" * (MAX_TEXT + 1)}), "message_too_long"),
    (b'{"message": "binary"}', "binary_frame"),
    (b"\x00\xff", "binary_frame"),
]


@pytest.mark.anyio
@asyncio_only
async def test_bad_frames_get_an_error_and_nothing_is_broadcast(server: ChatServer) -> None:
    room = "bad-input"
    async with client(server, "observer", room) as observer, client(server, "mallory", room) as bad:
        own = await recv(observer)
        join = await recv(bad)
        assert await recv(observer) == join
        for frame, code in BAD_FRAMES:
            await bad.send(frame)
            error = await recv(bad)
            assert error["type"] == "error", frame
            assert "seq" not in error
            assert error["data"]["code"] == code, frame
            assert isinstance(error["data"]["detail"], str)
            assert error["data"]["detail"]
        # Still open, and nothing reached the room: the next envelope is the next seq.
        await bad.send(json.dumps({"message": "still here"}))
        message = await recv(observer)
        assert message["type"] == "message"
        assert message["seq"] == join["seq"] + 1 > own["seq"]
        assert (await recv(bad)) == message
    assert "Traceback" not in server.stderr()


@pytest.mark.anyio
@asyncio_only
async def test_the_longest_message_counts_characters_not_bytes(server: ChatServer) -> None:
    async with client(server, "unicode", "unicode") as ws:
        await recv(ws)
        text = "é✓" * (MAX_TEXT // 2)  # MAX_TEXT characters, more bytes than that
        await ws.send(json.dumps({"message": text}, ensure_ascii=False))
        assert (await recv(ws))["data"] == {"message": text}


@pytest.mark.anyio
@asyncio_only
async def test_server_owned_fields_are_ignored(server: ChatServer) -> None:
    async with client(server, "honest", "owned") as ws:
        join = await recv(ws)
        # Not "room": a frame's room says where the message goes (test_chat_rooms.py).
        forged = {
            "message": "hi", "type": "leave", "seq": 999, "id": "forged",
            "client_id": "admin", "timestamp": "1999-01-01T00:00:00+00:00", "data": {"x": 1},
        }  # fmt: skip
        await ws.send(json.dumps(forged))
        message = await recv(ws)
        assert message["type"] == "message"
        assert message["room"] == "owned"
        assert message["seq"] == join["seq"] + 1
        assert message["id"] != "forged"
        assert message["client_id"] == "honest"
        assert message["timestamp"] > "2000"
        assert message["data"] == {"message": "hi"}


def refused(server: ChatServer, reason: str) -> int:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(
        rf'^chat_connections_refused_total{{reason="{reason}"}} (\d+)$', text, re.MULTILINE
    )
    assert match, reason
    return int(match.group(1))


@pytest.mark.anyio
@asyncio_only
async def test_an_oversized_frame_closes_with_1009(server: ChatServer) -> None:
    room = "too-big"
    too_big_before = refused(server, "message_too_big")
    async with client(server, "watcher", room) as watcher:
        await recv(watcher)
        async with client(server, "flooder", room) as flooder:
            join = await recv(flooder)
            assert await recv(watcher) == join
            await flooder.send(json.dumps({"message": "x" * MAX_BYTES}))
            with pytest.raises(ConnectionClosed):
                await recv(flooder)
            assert flooder.close_code == 1009
        leave = await recv(watcher)  # the oversized frame was not broadcast
        assert (leave["type"], leave["client_id"], leave["seq"]) == (
            "leave", "flooder", join["seq"] + 1
        )  # fmt: skip
    assert refused(server, "message_too_big") == too_big_before + 1


@pytest.mark.anyio
@asyncio_only
async def test_invalid_utf8_in_a_text_frame_closes_with_1007(server: ChatServer) -> None:
    async with client(server, "garbler", "utf8") as ws:
        await recv(ws)
        await ws.send(b'{"message": "\xff"}', text=True)
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        assert ws.close_code == 1007


@pytest.mark.parametrize(
    "path",
    [
        "/ws/a%20b",
        "/ws/" + "x" * 65,
        "/ws/caf%C3%A9",
        "/ws/semi;colon",
        "/ws/ok?room=",
        "/ws/ok?room=bad%20room",
        "/ws/ok?room=" + "r" * 65,
        "/ws/ok?room=%3Cscript%3E",
        "/ws/ok?room=a+b",  # + is a space in a query
        "/ws/ok?room=a%2Bb",
        "/ws/ok?room=a%7Bb%7D",
        "/ws/ok?room=a%2Fb",
        "/ws/a%2Fb",
        "/ws/ok?since=abc",
        "/ws/ok?since=-1",
        "/ws/ok?since=1.5",
        "/ws/ok?since=",
        "/ws/ok?since=1&epoch=",
        "/ws/ok?since=1&epoch=bad%20epoch",
        "/ws/ok?since=1&epoch=" + "e" * 33,
        "/ws/ok?since=1&epoch=%22%7D",
    ],
)
@pytest.mark.anyio
@asyncio_only
async def test_bad_names_and_since_are_refused_at_the_handshake(
    server: ChatServer, path: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws_url + path):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.anyio
@asyncio_only
async def test_longest_names_are_accepted(server: ChatServer) -> None:
    client_id, room = "A-z_0.9" + "c" * 57, "R" * 64
    async with client(server, client_id, room) as ws:
        join = await recv(ws)
        assert (join["client_id"], join["room"]) == (client_id, room)


@pytest.mark.anyio
@asyncio_only
async def test_namespaced_names_round_trip(server: ChatServer) -> None:
    """``user#42`` in ``chat:lobby``, percent-encoded in the URL as a browser's
    encodeURIComponent does (``#`` unescaped would start the fragment)."""
    async with (
        client(server, "user%2342", "chat%3Alobby") as user,
        client(server, "alice%40example.com", "chat%3Alobby") as alice,
    ):
        join = await recv(user)
        assert (join["type"], join["client_id"], join["room"]) == ("join", "user#42", "chat:lobby")
        assert (await recv(alice))["client_id"] == "alice@example.com"
        assert (await recv(user))["client_id"] == "alice@example.com"
        await user.send(json.dumps({"message": "hi"}))
        message = await recv(alice)
        assert await recv(user) == message
        assert (message["room"], message["client_id"], message["data"]) == (
            "chat:lobby", "user#42", {"message": "hi"}
        )  # fmt: skip
        body = httpx.get(f"{server.url}/rooms/chat%3Alobby").json()
        assert body == {
            "room": "chat:lobby",
            "online": ["alice@example.com", "user#42"],
            "seq": message["seq"],
        }
    refused = httpx.get(f"{server.url}/rooms/a%2Bb")
    assert refused.status_code == 400
    assert "A-Z a-z 0-9 _ . - : # @" in refused.json()["error"]


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1.evil.example", "https://allowed.example"],
)
@pytest.mark.anyio
@asyncio_only
async def test_a_foreign_origin_is_refused(server: ChatServer, origin: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with client(server, "victim", "origin", origin=origin):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.anyio
@asyncio_only
async def test_own_allowed_and_missing_origins_are_accepted(server: ChatServer) -> None:
    own = f"http://127.0.0.1:{server.port}"
    for origin in (own, ALLOWED, "https://other.example:8443", None):
        async with client(server, "origin-ok", "origin", origin=origin) as ws:
            assert (await recv(ws))["type"] == "join"


@pytest.mark.anyio
@asyncio_only
async def test_resume_sends_what_was_missed_without_gap_or_duplicate(server: ChatServer) -> None:
    room = "resume"
    async with client(server, "stayer", room) as stayer:
        await recv(stayer)
        async with client(server, "leaver", room) as leaver:
            seen = await recv(leaver)
            assert await recv(stayer) == seen
        missed = [await recv(stayer)]  # leaver's leave
        for n in range(3):
            await stayer.send(json.dumps({"message": f"missed {n}"}))
            missed.append(await recv(stayer))
        async with client(server, "leaver", room, since=seen["seq"]) as leaver:
            replay = [await recv(leaver) for _ in missed]
            assert replay == missed
            rejoin = await recv(leaver)
            assert (rejoin["type"], rejoin["client_id"]) == ("join", "leaver")
            assert rejoin["seq"] == missed[-1]["seq"] + 1
            assert await recv(stayer) == rejoin
            await stayer.send(json.dumps({"message": "live"}))
            live = await recv(leaver)
            assert (live["seq"], live["data"]) == (rejoin["seq"] + 1, {"message": "live"})


@pytest.mark.anyio
@asyncio_only
async def test_resume_from_now_sends_only_the_live_stream(server: ChatServer) -> None:
    room = "resume-now"
    async with client(server, "first", room) as first:
        join = await recv(first)
        async with client(server, "second", room, since=join["seq"]) as second:
            second_join = await recv(second)
            assert (second_join["client_id"], second_join["seq"]) == ("second", join["seq"] + 1)


@pytest.mark.anyio
@asyncio_only
async def test_resume_past_history_says_history_lost(server: ChatServer) -> None:
    room = "lost"
    async with client(server, "talker", room) as talker:
        await recv(talker)
        for n in range(HISTORY + 5):
            await talker.send(json.dumps({"message": f"m{n}"}))
            last = await recv(talker)
        async with client(server, "late", room, since=1) as late:
            lost = await recv(late)
            # The room's history already holds late's own join when it is read.
            assert lost == {
                "type": "history_lost",
                "room": room,
                "data": {
                    "since": 1,
                    "epoch": last["epoch"],
                    "first_seq": last["seq"] + 1 - HISTORY + 1,
                    "last_seq": last["seq"] + 1,
                },
            }
            join = await recv(late)
            assert (join["type"], join["seq"]) == ("join", last["seq"] + 1)


@pytest.mark.anyio
@asyncio_only
async def test_resume_ahead_of_the_room_says_history_lost(server: ChatServer) -> None:
    """A client that saw seq 500 before a restart gets history_lost with the stream's epoch,
    then the live stream (its own join first)."""
    room = "restarted"
    async with client(server, "early", room) as early:
        first = await recv(early)
        async with client(server, "returning", room, since=500) as returning:
            assert await recv(returning) == {
                "type": "history_lost",
                "room": room,
                # The room's history already holds returning's own join when it is read.
                "data": {
                    "since": 500,
                    "epoch": first["epoch"],
                    "first_seq": 1,
                    "last_seq": first["seq"] + 1,
                },
            }
            join = await recv(returning)
            assert (join["client_id"], join["seq"]) == ("returning", first["seq"] + 1)
            assert join["epoch"] == first["epoch"]


@pytest.mark.anyio
@asyncio_only
async def test_resume_with_another_epoch_says_history_lost(server: ChatServer) -> None:
    """A since the room has reached, but from another stream (a restart the client missed):
    history_lost with the current epoch, not envelopes of a stream the client never saw."""
    room = "other-epoch"
    async with client(server, "talker", room) as talker:
        join = await recv(talker)
        for n in range(3):
            await talker.send(json.dumps({"message": f"m{n}"}))
            last = await recv(talker)
        async with client(server, "back", room, since=1, epoch="old0epoch") as back:
            lost = await recv(back)
            assert lost == {
                "type": "history_lost",
                "room": room,
                "data": {
                    "since": 1,
                    "epoch": join["epoch"],
                    "first_seq": join["seq"],
                    "last_seq": last["seq"] + 1,
                },
            }
            rejoin = await recv(back)
            assert (rejoin["type"], rejoin["client_id"], rejoin["seq"]) == (
                "join", "back", last["seq"] + 1
            )  # fmt: skip


@pytest.mark.anyio
@asyncio_only
async def test_resume_with_the_stream_epoch_replays_history(server: ChatServer) -> None:
    room = "same-epoch"
    async with client(server, "talker", room) as talker:
        join = await recv(talker)
        await talker.send(json.dumps({"message": "missed"}))
        missed = await recv(talker)
        async with client(server, "back", room, since=join["seq"], epoch=join["epoch"]) as back:
            assert await recv(back) == missed
            rejoin = await recv(back)
            assert (rejoin["client_id"], rejoin["seq"]) == ("back", missed["seq"] + 1)


@pytest.mark.anyio
@asyncio_only
async def test_a_message_that_cannot_be_encoded_gets_invalid_message(server: ChatServer) -> None:
    """``{"message": "\\ud800"}`` is valid JSON but no text (a lone surrogate): the sender
    gets invalid_message, the room gets nothing, no seq is used."""
    room = "surrogate"
    async with client(server, "observer", room) as observer, client(server, "odd", room) as odd:
        await recv(observer)
        join = await recv(odd)
        assert await recv(observer) == join
        await odd.send('{"message": "\\ud800"}')
        error = await recv(odd)
        assert (error["type"], error["data"]["code"]) == ("error", "invalid_message")
        assert "seq" not in error
        await odd.send(json.dumps({"message": "fine"}))
        message = await recv(observer)  # the observer's next frame: nothing came between
        assert (message["data"], message["seq"]) == ({"message": "fine"}, join["seq"] + 1)
        assert await recv(odd) == message
    log = server.stderr()
    assert "Traceback" not in log
    assert "invalid_message" in httpx.get(f"{server.url}/metrics").text


@pytest.mark.anyio
@asyncio_only
async def test_rooms_are_isolated(server: ChatServer) -> None:
    async with client(server, "one", "iso-1") as one, client(server, "two", "iso-2") as two:
        join_one, join_two = await recv(one), await recv(two)
        assert join_one["seq"] == join_two["seq"] == 1
        await one.send(json.dumps({"message": "for room 1"}))
        await two.send(json.dumps({"message": "for room 2"}))
        got_one, got_two = await recv(one), await recv(two)
        assert (got_one["room"], got_one["seq"], got_one["data"]["message"]) == (
            "iso-1", 2, "for room 1"
        )  # fmt: skip
        assert (got_two["room"], got_two["seq"], got_two["data"]["message"]) == (
            "iso-2", 2, "for room 2"
        )  # fmt: skip


@pytest.mark.anyio
@asyncio_only
async def test_concurrent_senders_one_order_for_everyone(server: ChatServer) -> None:
    room = "order"
    senders, listeners, per_sender = 4, 3, 15
    total = senders * per_sender
    names = [f"sender-{n}" for n in range(senders)] + [f"listener-{n}" for n in range(listeners)]
    streams: dict[str, list[Any]] = {name: [] for name in names}
    async with AsyncExitStack() as stack:
        sockets = {}
        for name in names:
            sockets[name] = ws = await stack.enter_async_context(client(server, name, room))
            while (await recv(ws))["client_id"] != name:
                pass

        async def read(name: str) -> None:
            stream = streams[name]
            while sum(f["type"] == "message" for f in stream) < total:
                stream.append(await recv(sockets[name]))

        async def send(name: str) -> None:
            for n in range(per_sender):
                await sockets[name].send(json.dumps({"message": f"{name} #{n}"}))

        async with anyio.create_task_group() as task_group:
            for name in names:
                task_group.start_soon(read, name)
            for name in names[:senders]:
                task_group.start_soon(send, name)

    orders = {
        name: [(f["seq"], f["id"]) for f in stream if f["type"] == "message"]
        for name, stream in streams.items()
    }
    reference = orders[names[-1]]
    assert len(reference) == total
    for name, order in orders.items():
        assert order == reference, name
    seqs = [seq for seq, _ in reference]
    assert seqs == list(range(seqs[0], seqs[0] + total))
    texts = [f["data"]["message"] for f in streams[names[-1]] if f["type"] == "message"]
    for name in names[:senders]:  # each sender's messages in the order it sent them
        assert [t for t in texts if t.startswith(name + " ")] == [
            f"{name} #{n}" for n in range(per_sender)
        ]


@pytest.fixture(scope="module")
def limited(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server("--rate-limit", "2", kind=server_kind)


@pytest.mark.anyio
@asyncio_only
async def test_rate_limit(limited: ChatServer) -> None:
    """2 messages a second, bursts of 4: 12 frames at once cannot all pass."""
    async with client(limited, "chatty", "rate") as ws:
        await recv(ws)
        for n in range(12):
            await ws.send(json.dumps({"message": f"m{n}"}))
        frames = [await recv(ws) for _ in range(12)]
    accepted = [f for f in frames if f["type"] == "message"]
    refused = [f for f in frames if f["type"] == "error"]
    assert len(accepted) + len(refused) == 12
    assert 4 <= len(accepted) < 12
    assert {f["data"]["code"] for f in refused} == {"rate_limited"}
    assert [f["data"]["message"] for f in accepted[:4]] == ["m0", "m1", "m2", "m3"]


@pytest.fixture(scope="module")
def capped(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server("--rate-limit", "1", "--ip-rate-limit", "3", kind=server_kind)


@pytest.fixture(scope="module")
def few_per_ip(start_server: StartServer, server_kind: str) -> ChatServer:
    """A server of its own: no connection of another test can count against the cap."""
    return start_server("--max-connections-per-ip", "12", kind=server_kind)


async def _outcomes(ws: ClientConnection, count: int) -> list[str]:
    """The types of the next ``count`` frames (``message`` or ``error``) of a lone client."""
    frames = [await recv(ws) for _ in range(count)]
    assert {f["type"] for f in frames} <= {"message", "error"}, frames
    assert {f["data"]["code"] for f in frames if f["type"] == "error"} <= {"rate_limited"}
    return [f["type"] for f in frames]


async def _burst(server: ChatServer, clients: list[tuple[str, str]], frames: int) -> list[str]:
    """Connect each ``(client id, room)`` (one room each: nobody sees another's frames), then
    send ``frames`` messages from each at once; the outcome of every frame, in order."""
    async with AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(client(server, client_id, room))
            for client_id, room in clients
        ]
        for ws in sockets:
            assert (await recv(ws))["type"] == "join"
        for ws in sockets:
            for n in range(frames):
                await ws.send(json.dumps({"message": f"m{n}"}))
        return [outcome for ws in sockets for outcome in await _outcomes(ws, frames)]


@pytest.mark.anyio
@asyncio_only
async def test_the_rate_limit_holds_per_client_id_across_tabs(capped: ChatServer) -> None:
    """10 tabs of one client id (1 message a second, bursts of 2) send 3 frames each at once:
    they share one bucket, so about 2 pass, not 2 per tab."""
    outcomes = await _burst(capped, [("many-tabs", f"tab-{n}") for n in range(10)], 3)
    # Per connection, 20 would pass; a few more than 2 may, refilled while the test runs.
    assert 2 <= outcomes.count("message") < 10, outcomes


@pytest.mark.anyio
@asyncio_only
async def test_the_rate_limit_holds_per_ip_across_client_ids(capped: ChatServer) -> None:
    """10 client ids from one address (3 messages a second, bursts of 6, per IP) send 2
    frames each at once: each id's own bucket would let both pass; the address's does not."""
    outcomes = await _burst(capped, [(f"id-{n}", f"ids-{n}") for n in range(10)], 2)
    assert outcomes.count("message") < 15, outcomes
    assert outcomes.count("error") > 0


@pytest.mark.anyio
@asyncio_only
async def test_connections_per_ip_are_few_per_ip(few_per_ip: ChatServer) -> None:
    """12 connections from 127.0.0.1 are served; the 13th is refused with HTTP 429; once one
    closes, there is room again. One room each, so that no client has unread frames that
    would hold its close handshake back."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(client(few_per_ip, "cap-0", "cap-0"))
        await recv(first)
        for n in range(1, 12):
            ws = await stack.enter_async_context(client(few_per_ip, f"cap-{n}", f"cap-{n}"))
            while (await recv(ws))["client_id"] != f"cap-{n}":
                pass
        with pytest.raises(InvalidStatus) as refusal:
            async with client(few_per_ip, "cap-extra", "cap-extra"):
                pass
        assert refusal.value.response.status_code == 429
        await first.close()
        # The server counts the connection out once its handler has finished: retry, bounded.
        with anyio.fail_after(10):
            while True:
                try:
                    async with client(few_per_ip, "cap-extra", "cap-extra") as extra:
                        while (await recv(extra))["client_id"] != "cap-extra":
                            pass
                        break
                except InvalidStatus:
                    await anyio.sleep(0.05)  # polling another process, bounded
    text = httpx.get(f"{few_per_ip.url}/metrics").text
    assert re.search(
        r'^chat_connections_refused_total\{reason="too_many_connections"\} [1-9]', text, re.M
    )


def test_no_traceback_in_the_server_log(
    server: ChatServer, limited: ChatServer, capped: ChatServer, few_per_ip: ChatServer
) -> None:
    """Runs last in this module: every bad input above left no traceback in stderr."""
    for each in (server, limited, capped, few_per_ip):
        log = each.stderr()
        assert each.ready_line in log  # the log is really captured
        assert "Traceback" not in log
        assert "ERROR" not in log


@pytest.mark.anyio
@asyncio_only
async def test_sigterm_closes_the_connections_and_exits_cleanly(
    start_server: StartServer, server_kind: str
) -> None:
    node = start_server(kind=server_kind)
    process = node.process
    assert process is not None
    async with client(node, "stayer", "shutdown") as ws:
        await recv(ws)
        process.terminate()
        with pytest.raises(ConnectionClosed):
            await recv(ws)
    # uvicorn closes WebSockets with 1012 itself before the app shuts down; on websockets
    # the manager's exit closes them, with 1001.
    assert ws.close_code == {"uvicorn": 1012, "uvicorn-asgi": 1012, "websockets": 1001}[server_kind]
    # A graceful shutdown exits 0 on every server (uvicorn's signal is not raised again).
    assert await anyio.to_thread.run_sync(process.wait, 15) == 0
    assert "Traceback" not in node.stderr()
