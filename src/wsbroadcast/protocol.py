"""Deprecated: close codes and control messages are `wsbroadcast.control` (or `wsbroadcast`)."""

from __future__ import annotations

from ._deprecated import moved_module

__getattr__ = moved_module("wsbroadcast.protocol", "wsbroadcast.control")
