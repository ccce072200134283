"""Log a fact about the server's configuration once per process, not once per connection."""

from __future__ import annotations

import logging

__all__ = ["forget", "log_once"]

_logged: set[tuple[str, str]] = set()
"""(logger name, message) pairs already logged (:func:`forget` empties it)."""


def log_once(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` the first time this logger is given it, then never again.

    Why a connection cannot take the fast path (no ``wsbroadcast.frames`` extension,
    permessage-deflate negotiated) is the same for every connection of a server: once is
    enough to tell the operator, and a line per connection would flood the log.
    """
    key = (logger.name, message)
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


def forget() -> None:
    """Forget every fact logged so far: the next :func:`log_once` of each logs it again."""
    _logged.clear()
