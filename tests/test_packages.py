"""`wsbroadcast.backends` and `wsbroadcast.transports`: their interface, and adapters imported
only when used."""

from __future__ import annotations

import importlib

import pytest

import wsbroadcast
import wsbroadcast.backends
import wsbroadcast.transports
from wsbroadcast.backends import base as backends_base
from wsbroadcast.transports import base as transports_base


@pytest.mark.parametrize(
    ("package", "base"),
    [(wsbroadcast.backends, backends_base), (wsbroadcast.transports, transports_base)],
)
def test_a_package_re_exports_its_interface(package: object, base: object) -> None:
    for name in base.__all__:  # type: ignore[attr-defined]
        assert getattr(package, name) is getattr(base, name)


def test_the_interfaces_are_the_package_s_own() -> None:
    assert wsbroadcast.Backend is backends_base.Backend
    assert wsbroadcast.Transport is transports_base.Transport


@pytest.mark.parametrize(
    ("package", "name", "module"),
    [
        (wsbroadcast.backends, "MemoryBackend", "wsbroadcast.backends.memory"),
        (wsbroadcast.backends, "RedisBackend", "wsbroadcast.backends.redis"),
        (wsbroadcast.backends, "RedisClusterBackend", "wsbroadcast.backends.redis"),
        (wsbroadcast.transports, "StarletteTransport", "wsbroadcast.transports.starlette"),
        (wsbroadcast.transports, "StarletteFramesTransport", "wsbroadcast.transports.starlette"),
        (wsbroadcast.transports, "starlette_transport", "wsbroadcast.transports.starlette"),
        (wsbroadcast.transports, "WebSocketProtocol", "wsbroadcast.transports.uvicorn"),
        (wsbroadcast.transports, "WebsocketsTransport", "wsbroadcast.transports.websockets"),
    ],
)
def test_an_adapter_comes_from_its_module(package: object, name: str, module: str) -> None:
    assert getattr(package, name) is getattr(importlib.import_module(module), name)
    assert name in package.__all__  # type: ignore[attr-defined]


@pytest.mark.parametrize("package", [wsbroadcast.backends, wsbroadcast.transports])
def test_an_unknown_name_is_an_attribute_error(package: object) -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        package.Nothing  # type: ignore[attr-defined]  # noqa: B018
