"""Deprecated: the backend interface is `wsbroadcast.backends.base` (or `wsbroadcast`)."""

from __future__ import annotations

from ._deprecated import moved_module

__getattr__ = moved_module("wsbroadcast.backend", "wsbroadcast.backends.base")
