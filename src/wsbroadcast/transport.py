"""Deprecated: the transport interface is `wsbroadcast.transports.base` (or `wsbroadcast`)."""

from __future__ import annotations

from ._deprecated import moved_module

__getattr__ = moved_module("wsbroadcast.transport", "wsbroadcast.transports.base")
