"""The shared client scenarios (scenarios.json) run by wsbroadcast.client against the real
chat app, on uvicorn and on the websockets server, on asyncio and on trio.

clients/js/test/scenarios.test.js runs the same file with the JS client.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.backends.redis.redis_helpers import RedisServer
from tests.clients.chat_servers import ROOMS_PROTOCOL, SERVER_KINDS, ChatApp, StallProxy
from wsbroadcast import Envelope
from wsbroadcast.client import Client, Connected, Gap, HistoryLost, Subscribed, connect

SCENARIOS: list[dict[str, Any]] = json.loads(
    (Path(__file__).with_name("scenarios.json")).read_text()
)["scenarios"]
SCENARIO_TIMEOUT = 60.0
"""A hang guard per scenario, not a timing assertion."""

pytestmark = pytest.mark.anyio


class Tracked:
    """A client and everything it received, which steps wait on."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: dict[str, list[str]] = {}
        self.directs: list[str] = []
        self.events: Counter[tuple[str, str | None]] = Counter()
        self.ids: Counter[tuple[str, str]] = Counter()
        self._changed = anyio.Event()

    async def pump(self) -> None:
        async for item in self.client.events():
            if isinstance(item, Envelope):
                self.ids[(item.room, item.id)] += 1
                data: Any = item.data
                if item.type == "message":
                    self.messages.setdefault(item.room, []).append(data["message"])
                elif item.type == "direct":
                    self.directs.append(data["data"]["message"])
            elif isinstance(item, HistoryLost):
                self.events[("history_lost", item.room)] += 1
            elif isinstance(item, Subscribed):
                self.events[("subscribed", item.room)] += 1
            elif isinstance(item, Connected):
                self.events[("connected", None)] += 1
            elif isinstance(item, Gap):
                self.events[("gap", item.room)] += 1
            self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checked after every item received."""
        while not predicate():
            self._changed = anyio.Event()
            await self._changed.wait()

    def duplicates(self) -> list[tuple[str, str]]:
        return [key for key, count in self.ids.items() if count > 1]


async def run(scenario: dict[str, Any], kind: str, directory: Path) -> None:
    args = list(scenario.get("server_args", []))
    async with AsyncExitStack() as stack:
        if scenario["backend"] == "redis":
            executable = shutil.which("redis-server")
            assert executable is not None, "redis-server is needed (scripts/test installs it)"
            redis = RedisServer(executable)
            redis.start()
            stack.callback(redis.kill)
            args += ["--backend", redis.url]
        servers = [ChatApp(directory, kind, args) for _ in range(scenario.get("servers", 1))]
        for server in servers:
            stack.callback(server.kill)
            await anyio.to_thread.run_sync(server.start)
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)
        world = World(servers, task_group, stack)
        for step in scenario["steps"]:
            await do(step, world)
        clients = world.clients
        for name, tracked in clients.items():
            assert tracked.duplicates() == [], f"{name} received an envelope twice"


class World:
    """What a scenario's steps act on: its servers, clients and proxies, and what was published."""

    def __init__(
        self, servers: list[ChatApp], task_group: anyio.abc.TaskGroup, stack: AsyncExitStack
    ) -> None:
        self.servers = servers
        self.task_group = task_group
        self.stack = stack
        self.clients: dict[str, Tracked] = {}
        self.proxies: dict[str, StallProxy] = {}
        self.published: dict[str, list[str]] = {}


async def drops(server: ChatApp) -> float:
    """``chat_drops_total`` of ``server``: frames queued for a connection and never written."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text
    match = re.search(r"^chat_drops_total (\S+)$", text, flags=re.MULTILINE)
    assert match, "chat_drops_total not in /metrics"
    return float(match.group(1))


async def publish(tracked: Tracked, world: World, room: str, text: str) -> None:
    await tracked.client.publish(room, text)
    world.published.setdefault(room, []).append(text)


async def do(step: dict[str, Any], world: World) -> None:
    servers, clients, task_group = world.servers, world.clients, world.task_group
    action = step["do"]
    tracked = clients.get(step.get("client", ""))
    if action == "connect":
        url = f"{servers[step['server']].ws_url}/ws/{step['id']}"
        if step.get("proxy"):
            proxy = world.proxies[step["client"]] = StallProxy(servers[step["server"]].port)
            port = await task_group.start(proxy.serve)
            url = f"ws://127.0.0.1:{port}/ws/{step['id']}"
        client = connect(
            url, rooms=step["rooms"], min_reconnect_delay=0.05, max_reconnect_delay=0.5
        )
        await world.stack.enter_async_context(client)
        clients[step["client"]] = tracked = Tracked(client)
        task_group.start_soon(tracked.pump)
    elif action == "subscribe":
        assert tracked is not None
        await tracked.client.subscribe(step["room"])
    elif action == "wait_subscribed":
        assert tracked is not None
        room = step["room"]

        def subscribed() -> bool:
            position = tracked.client.position(room)
            confirmed = tracked.events[("subscribed", room)] > 0
            return confirmed and position is not None and position.seq is not None

        await tracked.until(subscribed)
    elif action == "publish":
        assert tracked is not None
        for text in step["texts"]:
            await publish(tracked, world, step["room"], text)
    elif action == "publish_until_dropped":
        assert tracked is not None
        room, server = step["room"], servers[step["server"]]
        sent = world.published.setdefault(room, [])
        while await drops(server) == 0:
            assert len(sent) < step["max"], "the server dropped nothing"
            for _ in range(step["batch"]):
                text = f"{step['prefix']}{len(sent) + 1} "
                await publish(tracked, world, room, text.ljust(step["size"], "x"))
            # Its own copies back: the server has fanned the batch out to every queue.
            await tracked.until(lambda: len(tracked.messages.get(room, [])) >= len(sent))
    elif action == "expect_all_published":
        assert tracked is not None
        room = step["room"]
        texts = world.published.get(room, [])
        await tracked.until(lambda: len(tracked.messages.get(room, [])) >= len(texts))
        assert tracked.messages[room] == texts
    elif action == "direct":
        assert tracked is not None
        for text in step["texts"]:
            await tracked.client.send_direct(step["to"], text)
    elif action == "expect_messages":
        assert tracked is not None
        room, texts = step["room"], step["texts"]
        await tracked.until(lambda: len(tracked.messages.get(room, [])) >= len(texts))
        assert tracked.messages[room] == texts
    elif action == "expect_directs":
        assert tracked is not None
        texts = step["texts"]
        await tracked.until(lambda: len(tracked.directs) >= len(texts))
        assert tracked.directs == texts
    elif action == "expect_event":
        assert tracked is not None
        key = (step["event"], step.get("room"))
        count = step.get("count", 1)
        await tracked.until(lambda: tracked.events[key] >= count)
    elif action == "expect_no_event":
        assert tracked is not None
        assert tracked.events[(step["event"], step.get("room"))] == 0
    elif action == "stall":
        world.proxies[step["client"]].stall()
    elif action == "unstall":
        world.proxies[step["client"]].unstall()
    elif action == "kill":
        servers[step["server"]].kill()
    elif action == "stop":
        await anyio.to_thread.run_sync(servers[step["server"]].stop)
    elif action == "restart":
        await anyio.to_thread.run_sync(servers[step["server"]].start)
    elif action == "disconnect":
        assert tracked is not None
        await tracked.client.close()
    else:
        raise AssertionError(f"unknown step {action!r}")


def scenario_params() -> Iterator[Any]:
    for scenario in SCENARIOS:
        marks = []
        if scenario.get("requires") == "rooms" and not ROOMS_PROTOCOL:
            marks.append(pytest.mark.skip(reason="this chat app has no rooms/DM protocol yet"))
        yield pytest.param(scenario, id=scenario["name"], marks=marks)


@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize("scenario", list(scenario_params()))
async def test_scenario(scenario: dict[str, Any], kind: str, tmp_path: Path) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        await run(scenario, kind, tmp_path)
