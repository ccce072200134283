"""Several rooms per connection and direct messages, end to end: ``python -m examples.chat_app``
in a subprocess on each server kind, real ``websockets`` clients over loopback.

Nothing here waits for time to pass: "nothing more arrives" is shown by a marker that is
published after whatever must not arrive, in a stream the client reads in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import anyio
import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

if TYPE_CHECKING:
    from tests.chat_app.servers import ChatServer, StartServer

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

MAX_ROOMS = 3
SECRET = "a-test-secret-of-at-least-32-characters!"
Frame = dict[str, Any]
Predicate = Callable[[Frame], bool]


@pytest.fixture(scope="module")
def server(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server(
        "--max-rooms", str(MAX_ROOMS), "--rate-limit", "0", "--history", "100",
        kind=server_kind,
    )  # fmt: skip


@pytest.fixture(scope="module")
def jwt_server(start_server: StartServer, server_kind: str) -> ChatServer:
    return start_server("--jwt-secret", SECRET, "--rate-limit", "0", kind=server_kind)


def envelope(type: str, room: str, client_id: str | None = None) -> Predicate:
    """Matches an envelope of ``type`` in ``room`` (from ``client_id``, when given)."""
    return lambda f: (
        "seq" in f
        and f["type"] == type
        and f["room"] == room
        and (client_id is None or f["client_id"] == client_id)
    )


def said(text: str) -> Predicate:
    """Matches the room message or direct message whose text is ``text``."""
    return lambda f: (
        "seq" in f
        and text
        in (
            (f["data"] or {}).get("message"),
            ((f["data"] or {}).get("data") or {}).get("message"),
        )
    )


def control(type: str, room: str) -> Predicate:
    """Matches an unsequenced frame of ``type`` about ``room``."""
    return lambda f: "seq" not in f and f["type"] == type and f["room"] == room


def error(code: str) -> Predicate:
    return lambda f: f["type"] == "error" and f["data"]["code"] == code


class Tab:
    """One WebSocket of a client, keeping every frame it read."""

    def __init__(self, ws: ClientConnection, client_id: str) -> None:
        self.ws = ws
        self.client_id = client_id
        self.frames: list[Frame] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def next(self) -> Frame:
        with anyio.fail_after(10):  # a hang guard
            frame: Frame = json.loads(await self.ws.recv())
        self.frames.append(frame)
        return frame

    async def until(self, *predicates: Predicate) -> list[Frame]:
        """Read until each predicate has matched a frame; return the frames read."""
        left = list(predicates)
        read = []
        while left:
            frame = await self.next()
            read.append(frame)
            left = [p for p in left if not p(frame)]
        return read

    async def ready(self, announced: bool = True) -> list[Frame]:
        """The frames of the connect: the client's join (unless another tab of it is in the
        room already) and its personal stream's ``joined``."""
        predicates = [control("joined", "@" + self.client_id)]
        if announced:
            predicates.append(envelope("join", self.room, self.client_id))
        return await self.until(*predicates)

    room = ""


def ws_url(server: ChatServer, client_id: str, room: str, **query: object) -> str:
    params = urlencode({"room": room, **{k: v for k, v in query.items() if v is not None}})
    return f"{server.ws_url}/ws/{quote(client_id, safe='')}?{params}"


@asynccontextmanager
async def tab(server: ChatServer, client_id: str, room: str, **query: object) -> AsyncIterator[Tab]:
    async with connect(ws_url(server, client_id, room, **query)) as ws:
        opened = Tab(ws, client_id)
        opened.room = room
        yield opened


def seqs(frames: list[Frame], room: str) -> list[int]:
    return [f["seq"] for f in frames if "seq" in f and f["room"] == room]


@pytest.mark.anyio
@asyncio_only
async def test_a_second_room_joined_mid_connection_takes_messages(server: ChatServer) -> None:
    async with (
        tab(server, "two-alice", "two-a") as alice,
        tab(server, "two-bob", "two-b") as bob,
    ):
        first = await alice.ready()
        personal = next(f for f in first if control("joined", "@two-alice")(f))
        assert personal["data"]["seq"] == 0  # no direct message yet
        await bob.ready()
        await alice.send(join="two-b")
        frames = await alice.until(envelope("join", "two-b", "two-alice"))
        joined = next(f for f in frames if control("joined", "two-b")(f))
        own_join = frames[-1]
        assert frames.index(joined) < frames.index(own_join)
        assert own_join["seq"] == joined["data"]["seq"] + 1
        assert own_join["epoch"] == joined["data"]["epoch"]
        assert (await bob.until(envelope("join", "two-b", "two-alice")))[-1] == own_join
        online = httpx.get(f"{server.url}/rooms/two-b").json()["online"]
        assert online == ["two-alice", "two-bob"]

        await alice.send(room="two-b", message="hello b")
        in_b = (await bob.until(said("hello b")))[-1]
        assert (in_b["type"], in_b["room"], in_b["client_id"]) == ("message", "two-b", "two-alice")
        assert in_b["seq"] == own_join["seq"] + 1
        assert (await alice.until(said("hello b")))[-1] == in_b
        await bob.send(message="from bob")  # bob's first room: two-b
        assert (await alice.until(said("from bob")))[-1]["room"] == "two-b"

        await alice.send(message="hello a")  # {"message"} alone: the connection's first room
        in_a = (await alice.until(said("hello a")))[-1]
        assert (in_a["room"], in_a["client_id"]) == ("two-a", "two-alice")
        assert not [f for f in bob.frames if f["room"] == "two-a"]
    assert "Traceback" not in server.stderr()


@pytest.mark.anyio
@asyncio_only
async def test_interleaved_traffic_keeps_each_rooms_seqs_without_gap(server: ChatServer) -> None:
    per_room = 30
    async with (
        tab(server, "mixer", "mix-a") as mixer,
        tab(server, "talker-a", "mix-a") as talker_a,
        tab(server, "talker-b", "mix-b") as talker_b,
    ):
        await mixer.ready()
        await talker_a.ready()
        await talker_b.ready()
        await mixer.send(join="mix-b")
        start = len(mixer.frames)
        await mixer.until(control("joined", "mix-b"))

        async def talk(sender: Tab, room: str) -> None:
            for n in range(per_room):
                await sender.send(room=room, message=f"{room} {sender.client_id} {n}")

        async def drain(talker: Tab, room: str) -> None:
            """Read the room to its end: unread frames would hold the close handshake back."""
            last = per_room - 1
            await talker.until(
                said(f"{room} {talker.client_id} {last}"), said(f"{room} mixer {last}")
            )

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(talk, talker_a, "mix-a")
            task_group.start_soon(talk, talker_b, "mix-b")
            task_group.start_soon(talk, mixer, "mix-a")
            task_group.start_soon(talk, mixer, "mix-b")
            task_group.start_soon(drain, talker_a, "mix-a")
            task_group.start_soon(drain, talker_b, "mix-b")
            wanted = {
                f"{room} {who} {n}"
                for room, who in [
                    ("mix-a", "talker-a"), ("mix-b", "talker-b"),
                    ("mix-a", "mixer"), ("mix-b", "mixer"),
                ]
                for n in range(per_room)
            }  # fmt: skip
            seen: list[str] = []
            while not wanted <= set(seen):
                frame = await mixer.next()
                if frame["type"] == "message":
                    seen.append(frame["data"]["message"])
        assert sorted(seen) == sorted(wanted)  # each once
        frames = mixer.frames[start:]
        for room in ("mix-a", "mix-b"):
            numbers = seqs(frames, room)
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), room
            texts = [f["data"]["message"] for f in frames if envelope("message", room)(f)]
            for who in ("mixer", f"talker-{room[-1]}"):  # each sender's order is kept
                mine = [t for t in texts if t.split()[1] == who]
                assert mine == [f"{room} {who} {n}" for n in range(per_room)]
        first_b = next(f for f in frames if envelope("join", "mix-b", "mixer")(f))
        joined = next(f for f in frames if control("joined", "mix-b")(f))
        assert first_b["seq"] == joined["data"]["seq"] + 1


@pytest.mark.anyio
@asyncio_only
async def test_leave_acknowledges_and_nothing_of_the_room_follows(server: ChatServer) -> None:
    async with (
        tab(server, "leaver", "leave-a") as leaver,
        tab(server, "stayer", "leave-b") as stayer,
    ):
        await leaver.ready()
        await stayer.ready()
        await leaver.send(join="leave-b")
        await leaver.until(envelope("join", "leave-b", "leaver"))
        await stayer.until(envelope("join", "leave-b", "leaver"))

        await leaver.send(leave="leave-b")
        left = (await leaver.until(control("left", "leave-b")))[-1]
        assert left == {"type": "left", "room": "leave-b", "data": None}
        await stayer.until(envelope("leave", "leave-b", "leaver"))
        assert httpx.get(f"{server.url}/rooms/leave-b").json()["online"] == ["stayer"]
        for n in range(3):
            await stayer.send(message=f"after the leave {n}")
        await stayer.until(said("after the leave 2"))

        # Refused now: a message to the room left, and leaving it again.
        await leaver.send(room="leave-b", message="still here?")
        refused = (await leaver.until(error("not_joined")))[-1]
        assert refused["room"] == "leave-b"
        await leaver.send(leave="leave-b")
        assert (await leaver.until(error("not_joined")))[-1]["room"] == "leave-b"
        # The marker comes after everything stayer published in leave-b.
        await leaver.send(message="marker")
        after = leaver.frames[leaver.frames.index(left) + 1 :] + await leaver.until(said("marker"))
        assert [f for f in after if f["room"] == "leave-b" and f["type"] != "error"] == []

        # Leaving the first room too: {"message"} alone has nowhere to go.
        await leaver.send(leave="leave-a")
        await leaver.until(control("left", "leave-a"))
        await leaver.send(message="nowhere")
        assert (await leaver.until(error("not_joined")))[-1]["room"] == "leave-a"


@pytest.mark.anyio
@asyncio_only
async def test_resume_of_every_room_sends_exactly_what_was_missed(server: ChatServer) -> None:
    """alice leaves for a while: on her return the URL's room resumes through since/epoch,
    the joined room through a join with since/epoch, and her direct messages through
    dm_since/dm_epoch; each gets exactly the envelopes she missed."""
    async with (
        tab(server, "bob", "resume-a") as bob,
        tab(server, "carol", "resume-b") as carol,
    ):
        await bob.ready()
        await carol.ready()
        async with tab(server, "alice", "resume-a") as alice:
            await alice.ready()
            await alice.send(join="resume-b")
            await alice.until(envelope("join", "resume-b", "alice"))
            await bob.send(message="before a")
            await carol.send(message="before b")
            await bob.send(to="alice", message="dm before")
            await alice.until(said("before a"), said("before b"), said("dm before"))
            last = {}
            for room in ("resume-a", "resume-b", "@alice"):
                last[room] = [f for f in alice.frames if "seq" in f and f["room"] == room][-1]
        await bob.until(envelope("leave", "resume-a", "alice"))
        await carol.until(envelope("leave", "resume-b", "alice"))
        for n in range(3):
            await bob.send(message=f"missed a {n}")
            await carol.send(message=f"missed b {n}")
        await carol.send(to="alice", message="dm missed")
        await bob.until(said("missed a 2"))
        await carol.until(said("missed b 2"), said("dm missed"))

        a, b, dm = last["resume-a"], last["resume-b"], last["@alice"]
        query = {"since": a["seq"], "epoch": a["epoch"]}
        query |= {"dm_since": dm["seq"], "dm_epoch": dm["epoch"]}
        async with tab(server, "alice", "resume-a", **query) as back:
            await back.send(join="resume-b", since=b["seq"], epoch=b["epoch"])
            await back.until(
                envelope("join", "resume-a", "alice"),
                envelope("join", "resume-b", "alice"),
                control("joined", "@alice"),
            )
            await bob.until(envelope("join", "resume-a", "alice"))
            await carol.until(envelope("join", "resume-b", "alice"))
            await back.send(to="alice", message="marker")  # after all of it, in @alice
            await back.until(said("marker"))
            got = back.frames
            assert not [f for f in got if f["type"] in ("history_lost", "error")], got
            for room, last_seen, witness in (
                ("resume-a", a, bob),
                ("resume-b", b, carol),
            ):
                missed = [
                    f for f in witness.frames
                    if "seq" in f and f["room"] == room and f["seq"] > last_seen["seq"]
                ]  # fmt: skip
                replayed = [f for f in got if "seq" in f and f["room"] == room]
                assert replayed == missed, room
                assert envelope("leave", room, "alice")(missed[0])
                assert envelope("join", room, "alice")(missed[-1])
                assert len(missed) == 5  # her leave, three messages, her join
            directs = [f for f in got if "seq" in f and f["room"] == "@alice"]
            assert [f["data"]["data"]["message"] for f in directs] == ["dm missed", "marker"]
            assert directs[0]["seq"] == dm["seq"] + 1
            # The joined frame says which seq the replay reached; the live stream follows it.
            joined_b = next(f for f in got if control("joined", "resume-b")(f))
            before = seqs(got[: got.index(joined_b)], "resume-b")
            assert joined_b["data"] == {"seq": before[-1], "epoch": b["epoch"]}
            assert seqs(got, "resume-b") == list(range(b["seq"] + 1, b["seq"] + 6))


@pytest.mark.anyio
@asyncio_only
async def test_refused_joins_answer_an_error_and_the_connection_goes_on(
    server: ChatServer,
) -> None:
    async with tab(server, "picky", "refused-a") as picky, tab(server, "other", "x") as other:
        await picky.ready()
        await other.ready()
        refusals: list[tuple[dict[str, Any], str, str | None]] = [
            ({"join": "a b"}, "invalid_room", "refused-a"),
            ({"join": ""}, "invalid_room", "refused-a"),
            ({"join": 7}, "invalid_room", "refused-a"),
            ({"join": "@other"}, "forbidden_room", "@other"),
            ({"join": "refused-a"}, "already_joined", "refused-a"),
            ({"join": "@picky"}, "already_joined", "@picky"),
            ({"join": "new", "since": -1}, "bad_since", "new"),
            ({"join": "new", "since": "7"}, "bad_since", "new"),
            ({"join": "new", "since": 1, "epoch": "not ok"}, "bad_epoch", "new"),
            ({"leave": "@picky"}, "forbidden_room", "@picky"),
            ({"leave": "never-joined"}, "not_joined", "never-joined"),
            ({"room": "never-joined", "message": "hi"}, "not_joined", "never-joined"),
            ({"room": "@picky", "message": "hi"}, "not_joined", "@picky"),
            ({"room": "@other", "message": "hi"}, "not_joined", "@other"),
            ({"to": "a b", "message": "hi"}, "invalid_recipient", "refused-a"),
        ]
        for n, (frame, code, room) in enumerate(refusals):
            await picky.send(**frame)
            answer = await picky.next()
            assert answer["type"] == "error", (frame, answer)
            assert (answer["data"]["code"], answer["room"]) == (code, room), frame
            assert answer["data"]["detail"]
            await picky.send(message=f"still here {n}")  # and it still sends and receives
            echo = await picky.next()
            assert (echo["type"], echo["data"]) == ("message", {"message": f"still here {n}"})

        # --max-rooms counts the first room and every room joined, not the personal stream.
        for n in range(1, MAX_ROOMS):
            await picky.send(join=f"refused-{n}")
            await picky.until(envelope("join", f"refused-{n}", "picky"))
        await picky.send(join="one-too-many")
        answer = (await picky.until(error("too_many_rooms")))[-1]
        assert answer["room"] == "one-too-many"
        await picky.send(leave="refused-1")
        await picky.until(control("left", "refused-1"))
        await picky.send(join="one-too-many")  # room again
        await picky.until(control("joined", "one-too-many"))
        await picky.send(room="one-too-many", message="made it")
        assert (await picky.until(said("made it")))[-1]["room"] == "one-too-many"
        # Nobody else got anything of it: other's next frame is its own marker.
        await other.send(message="other marker")
        assert [f["type"] for f in await other.until(said("other marker"))] == ["message"]
    log = server.stderr()
    assert "Traceback" not in log
    assert "ERROR" not in log


@pytest.mark.anyio
@asyncio_only
async def test_the_tokens_rooms_claim_limits_joins(jwt_server: ChatServer) -> None:
    claims = {"sub": "agent", "exp": int(time.time()) + 600, "rooms": ["team:*"]}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    async with tab(jwt_server, "agent", "team:a", token=token) as agent:
        await agent.ready()
        await agent.send(join="elsewhere")
        refused = (await agent.until(error("forbidden_room")))[-1]
        assert refused["room"] == "elsewhere"
        await agent.send(join="team:b")  # the claim allows it
        await agent.until(control("joined", "team:b"), envelope("join", "team:b", "agent"))
        await agent.send(room="team:b", message="in b")
        assert (await agent.until(said("in b")))[-1]["room"] == "team:b"
        await agent.send(to="agent", message="note to self")  # direct messages need no claim
        note = (await agent.until(said("note to self")))[-1]
        assert (note["type"], note["room"]) == ("direct", "@agent")


@pytest.mark.anyio
@asyncio_only
async def test_a_direct_message_reaches_each_tab_of_both_once(server: ChatServer) -> None:
    async with AsyncExitStack() as stack:
        tabs: dict[str, Tab] = {}
        for name, client_id, room in [
            ("alice1", "dm-alice", "dm-room"), ("alice2", "dm-alice", "dm-other"),
            ("bob1", "dm-bob", "dm-room"), ("bob2", "dm-bob", "dm-room"),
            ("carol", "dm-carol", "dm-room"),
        ]:  # fmt: skip
            tabs[name] = await stack.enter_async_context(tab(server, client_id, room))
            await tabs[name].ready(announced=name != "bob2")
        await tabs["alice1"].send(to="dm-bob", message="psst")
        copies = {
            name: (await tabs[name].until(said("psst")))[-1] for name in tabs if name != "carol"
        }
        recipient = copies["bob1"]
        assert recipient["type"] == "direct"
        assert recipient["client_id"] == "dm-alice"
        assert recipient["data"] == {"to": "dm-bob", "data": {"message": "psst"}}
        for name, copy in copies.items():
            expected_room = "@dm-bob" if name.startswith("bob") else "@dm-alice"
            assert copy["room"] == expected_room, name
            assert copy["id"] == recipient["id"], name  # one message, two streams
        assert copies["bob1"] == copies["bob2"]
        assert copies["alice1"] == copies["alice2"]
        # Exactly once each, and carol gets nothing: markers published after it, in the same
        # streams, bound what can have arrived.
        await tabs["alice1"].send(to="dm-bob", message="marker")
        await tabs["carol"].send(to="dm-carol", message="carol marker")  # to oneself: one copy
        for name in ("alice1", "alice2", "bob1", "bob2"):
            frames = await tabs[name].until(said("marker"))
            assert sum(said("psst")(f) for f in tabs[name].frames) == 1, name
            assert not any(f["type"] == "error" for f in frames), frames
        carol = await tabs["carol"].until(said("carol marker"))
        assert [f["room"] for f in carol if "seq" in f] == ["@dm-carol"]
        assert not any(said("psst")(f) for f in tabs["carol"].frames)
        # Nor did the DM touch any room: dm-room's seq counts joins only.
        room_frames = [f for f in tabs["bob1"].frames if f.get("room") == "dm-room"]
        assert {f["type"] for f in room_frames} == {"join"}


@pytest.mark.anyio
@asyncio_only
async def test_a_direct_message_waits_for_an_offline_recipient(server: ChatServer) -> None:
    async with tab(server, "sender", "offline-dm") as sender:
        await sender.ready()
        await sender.send(to="offline-dave", message="while you were out")
        own = (await sender.until(said("while you were out")))[-1]
        assert own["room"] == "@sender"
    async with tab(server, "offline-dave", "offline-dm", dm_since=0) as dave:
        frames = await dave.ready()
        directs = [f for f in frames if f["type"] == "direct"]
        assert len(directs) == 1
        kept = directs[0]
        assert (kept["room"], kept["client_id"], kept["id"]) == (
            "@offline-dave",
            "sender",
            own["id"],
        )
        assert kept["data"] == {"to": "offline-dave", "data": {"message": "while you were out"}}
        joined = next(f for f in frames if control("joined", "@offline-dave")(f))
        assert frames.index(joined) > frames.index(kept)  # history first, then joined
        assert joined["data"] == {"seq": kept["seq"], "epoch": kept["epoch"]}
    # Without dm_since, only what comes next: the kept message is not sent again.
    async with tab(server, "offline-dave", "offline-dm") as again:
        frames = await again.ready()
        assert not [f for f in frames if f["type"] == "direct"]


@pytest.mark.parametrize(
    "query",
    ["room=%40someone", "room=%40", "dm_since=x", "dm_since=-1", "dm_since=1&dm_epoch=a%20b"],
)
@pytest.mark.anyio
@asyncio_only
async def test_personal_streams_and_bad_dm_positions_are_refused_at_the_handshake(
    server: ChatServer, query: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{server.ws_url}/ws/someone?{query}"):
            pass
    assert refused.value.response.status_code == 403


def test_personal_streams_are_not_rooms_over_http(server: ChatServer) -> None:
    response = httpx.get(f"{server.url}/rooms/%40alice")
    assert response.status_code == 403
    assert "personal" in response.json()["error"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for code in ("not_joined", "already_joined", "forbidden_room", "too_many_rooms"):
        assert f'chat_errors_total{{code="{code}"}}' in metrics
    assert 'chat_connections_refused_total{reason="forbidden_room"}' in metrics
