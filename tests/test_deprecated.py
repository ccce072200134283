"""Every name renamed in 0.2 still works for one release, and says so with a DeprecationWarning."""

from __future__ import annotations

import importlib
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import wsbroadcast
import wsbroadcast.control
import wsbroadcast.frames
import wsbroadcast.manager
from wsbroadcast import (
    BackendHealth,
    ConnectionManager,
    ControlMessage,
    InvalidBackendOptions,
    InvalidBackendURL,
    ManagerStatistics,
    OutboundQueue,
)
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.metrics import ManagerCollector
from wsbroadcast.outbound import frames_of
from wsbroadcast.testing import MemoryTransport

MOVED = [
    (
        "wsbroadcast.backend",
        "wsbroadcast.backends.base",
        [
            "Backend",
            "History",
            "Listener",
            "ResetListener",
            "StreamReset",
            "Subscription",
            "backend_from_url",
        ],
    ),
    (
        "wsbroadcast.transport",
        "wsbroadcast.transports.base",
        [
            "FRAMES_EXTENSION",
            "BatchTransport",
            "FramesExtension",
            "NowaitBatchTransport",
            "Transport",
        ],
    ),
    (
        "wsbroadcast.protocol",
        "wsbroadcast.control",
        ["RESERVED_TYPES", "CloseCode", "control_frame", "error_frame"],
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "name"), [(old, new, name) for old, new, names in MOVED for name in names]
)
def test_a_moved_module_still_gives_each_name_with_a_warning(old: str, new: str, name: str) -> None:
    module = importlib.import_module(old)
    with pytest.deprecated_call(match=f"{old}.{name} is deprecated: use {new}.{name}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", [old for old, _, _ in MOVED])
def test_a_moved_module_knows_no_other_name(old: str) -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        importlib.import_module(old).nothing  # noqa: B018


def test_from_import_of_a_moved_module_warns() -> None:
    with pytest.deprecated_call():
        from wsbroadcast.backend import Backend
    assert Backend is wsbroadcast.Backend


@pytest.mark.parametrize("module", [wsbroadcast, wsbroadcast.control])
def test_control_frame_and_error_frame_warn_and_return_the_text(module: object) -> None:
    with pytest.deprecated_call(match="control_frame"):
        text = module.control_frame("joined", "red", {"seq": 1})  # type: ignore[attr-defined]
    assert text == ControlMessage("joined", "red", {"seq": 1}).text
    with pytest.deprecated_call(match="error_frame"):
        text = module.error_frame("bad", "no", "red")  # type: ignore[attr-defined]
    assert text == ControlMessage.error("bad", "no", "red").text
    assert isinstance(text, str)


def test_frames_bytes_is_frames_of() -> None:
    with pytest.deprecated_call(match="frames_of"):
        frames_bytes = wsbroadcast.frames.frames_bytes
    assert frames_bytes is frames_of
    messages = [ControlMessage.left("a"), ControlMessage.left("b")]
    assert frames_bytes(messages) == messages[0].frame + messages[1].frame
    with pytest.raises(AttributeError):
        wsbroadcast.frames.nothing  # noqa: B018


@pytest.mark.parametrize("module", [wsbroadcast, wsbroadcast.manager])
def test_manager_stats_is_manager_statistics(module: object) -> None:
    with pytest.deprecated_call(match="ManagerStatistics"):
        cls = module.ManagerStats  # type: ignore[attr-defined]
    assert cls is ManagerStatistics
    with pytest.raises(AttributeError):
        module.ManagerNothing  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.anyio
async def test_stats_is_statistics() -> None:
    async with ConnectionManager() as manager:
        await manager.connect(MemoryTransport(), "alice")
        with pytest.deprecated_call(match=r"statistics\(\)"):
            stats = manager.stats()
        assert stats == manager.statistics()
        assert stats.connections == 1


@pytest.mark.anyio
async def test_memory_transport_frames_and_wait_for_frames() -> None:
    async with ConnectionManager() as manager:
        transport = MemoryTransport()
        await manager.connect(transport, "alice")
        with pytest.deprecated_call(match="wait_for_messages"):
            await transport.wait_for_frames(1)
        with pytest.deprecated_call(match="MemoryTransport.texts"):
            frames = transport.frames
        assert frames is transport.texts
        assert json.loads(frames[0])["type"] == "join"


def test_push_text_queues_the_text_as_a_control_message() -> None:
    queue = OutboundQueue("lobby")
    queue.go_live(0)
    with pytest.deprecated_call(match="push_message"):
        assert queue.push_text('{"type":"notice","room":"lobby","data":1}')
    [message] = queue.take()
    assert isinstance(message, ControlMessage)
    assert (message.type, message.room, message.data) == ("notice", "lobby", 1)
    assert message.text == '{"type":"notice","room":"lobby","data":1}'


def test_room_live_and_remove_room_still_take_an_ack_as_text() -> None:
    queue = OutboundQueue("lobby")
    queue.go_live(0)
    queue.add_room("red")
    with pytest.deprecated_call(match="ControlMessage"):
        queue.room_live("red", 0, '{"type":"joined","room":"red","data":null}')
    with pytest.deprecated_call(match="ControlMessage"):
        assert queue.remove_room("red", '{"type":"left","room":"red","data":null}')
    assert [(message.type, message.room) for message in queue.take()] == [
        ("joined", "red"),
        ("left", "red"),
    ]


def test_health_reads_like_the_dict_it_was() -> None:
    health = MemoryBackend().health()
    assert isinstance(health, BackendHealth)
    assert (health.status, health.ok, health.backend) == ("ok", True, "MemoryBackend")
    assert health.as_dict() == {"status": "ok", "backend": "MemoryBackend"}
    with pytest.deprecated_call(match=r"health\(\)\.status"):
        assert health["status"] == "ok"
    with pytest.deprecated_call(), pytest.raises(KeyError):
        health["nothing"]
    with pytest.deprecated_call(match=r"health\(\)\.backend"):
        assert health.get("backend") == "MemoryBackend"
    with pytest.deprecated_call():
        assert health.get("nothing", 7) == 7


class _DictHealthBackend(MemoryBackend):
    """A backend written for the old interface: `health()` returns a dict."""

    def health(self) -> dict[str, object]:  # type: ignore[override]
        return {"status": "degraded", "backend": "old", "reconnects": 2}


@pytest.mark.anyio
async def test_metrics_still_read_a_health_dict_with_a_warning() -> None:
    async with ConnectionManager(_DictHealthBackend()) as manager:
        registry = CollectorRegistry()
        registry.register(ManagerCollector(manager))
        with pytest.deprecated_call(match="BackendHealth"):
            text = generate_latest(registry).decode()
    assert "wsbroadcast_backend_up 0.0" in text
    assert "wsbroadcast_backend_reconnects_total 2.0" in text


def test_invalid_backend_options_are_still_invalid_backend_urls() -> None:
    with pytest.raises(InvalidBackendOptions):
        MemoryBackend(history_size=-1)
    with pytest.raises(InvalidBackendURL):
        MemoryBackend(history_size=-1)
    with pytest.raises(InvalidBackendURL) as info:
        wsbroadcast.backend_from_url("nothing://")
    assert not isinstance(info.value, InvalidBackendOptions)
