"""Shorter garbage-collector pauses for a server that holds many connections.

CPython frees most objects by reference counting. What its cycle collector must find is
cheap to find among young objects, but a *full* collection traverses every object in the
oldest generation, and a server with thousands of open connections holds hundreds of
thousands of them (about 170 per connection for the chat app on uvicorn). Each full
collection stops the event loop meanwhile: 300 ms with 3,000 connections on the machine of
``docs/performance.md``. Full collections come whenever the long-lived objects have grown
by a quarter since the last one, which is exactly when clients are connecting: at startup,
and during a reconnect storm. (Or when the application keeps objects from each message it
handles: the memory backend's histories were that, until they kept atomic values only.)

`GCPauses` measures those pauses, and by default shortens them: after each full collection,
it moves every object that survived to the permanent generation (`gc.freeze`), so that the
next full collection traverses only what was allocated since. A pause is then proportional
to what changed since the last one, not to the number of connections.

Frozen objects are still freed by reference counting, the way nearly every object is. What
the collector no longer does is free a frozen object caught in a reference cycle that
became unreachable after the freeze. wsbroadcast's connections make no such cycle when they
close (tested on its uvicorn, Starlette and ``websockets`` transports). To bound what other
code's cycles could keep, the permanent generation is thawed (`gc.unfreeze`) and the whole
heap collected once it has grown to ``regrow`` times its size after the last whole
collection: one long pause each time the heap doubles, instead of one each time it grows by
a quarter, and none while clients only come and go.

    async with GCPauses() as pauses:
        ...  # serve
    print(pauses.statistics().longest_pause)

`wsbroadcast.metrics.GCPausesCollector` reports the statistics to Prometheus.

One per process, entered inside the event loop (asyncio or trio): the collector may run in
any thread that allocates, so the freeze is handed to the loop, which runs it between
callbacks. For CPython's generational collector (3.10 to 3.13, and 3.14.5 on); on a build
without a full collection to time, it measures nothing and freezes nothing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

__all__ = ["GCPauseStatistics", "GCPauses"]

_OLDEST = 2
"""The generation a full collection collects, in ``gc.callbacks``' ``info``."""


@dataclass(frozen=True)
class GCPauseStatistics:
    """What `GCPauses.statistics` reports, since the pauses were installed."""

    full_collections: int
    """Full collections, whatever started them (``gc.collect()`` included)."""
    last_pause: float
    """Seconds the last full collection took (0.0 before the first)."""
    longest_pause: float
    """Seconds the longest full collection took."""
    total_pause: float
    """Seconds all full collections took together."""
    freezes: int
    """Times the survivors of a full collection were frozen."""
    thaws: int
    """Times the permanent generation was thawed and the whole heap collected, the
    permanent generation having grown to ``regrow`` times its size after the last whole
    collection."""
    frozen: int
    """Objects in the permanent generation after the last freeze (0 once thawed)."""


class GCPauses:
    """Measure CPython's full garbage collections and, with ``freeze``, shorten them (see
    the module's documentation).

    :param freeze: freeze the survivors of each full collection; false only measures.
    :param regrow: thaw and collect the whole heap once the permanent generation has grown
        to this many times its size after the last whole collection (more than 1).
    """

    _installed: ClassVar[GCPauses | None] = None

    def __init__(self, *, freeze: bool = True, regrow: float = 2.0) -> None:
        if not regrow > 1:
            raise ValueError(f"regrow must be more than 1, not {regrow}")
        self.freeze = freeze
        self.regrow = regrow
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._started: float | None = None
        self._pending = False
        self._baseline: int | None = None
        self._full = self._freezes = self._thaws = self._frozen = 0
        self._last = self._longest = self._total = 0.0

    @classmethod
    def current(cls) -> GCPauses | None:
        """The `GCPauses` installed in this process, if any (for metrics)."""
        return cls._installed

    async def __aenter__(self) -> GCPauses:
        self.install()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.uninstall()

    def install(self) -> None:
        """Start measuring (and freezing); call it in the event loop's thread.

        Raises `RuntimeError` outside a running asyncio or trio loop, or if a `GCPauses` is
        installed in this process already (the collector is the process's).
        """
        if GCPauses._installed is not None:
            raise RuntimeError("a GCPauses is installed in this process already")
        self._schedule = _loop_scheduler()
        gc.callbacks.append(self._on_collection)
        GCPauses._installed = self

    def uninstall(self) -> None:
        """Stop, and thaw what was frozen (the collector is as it was; a freeze made before
        `install` is thawed too). Does nothing if not installed."""
        if GCPauses._installed is not self:
            return
        gc.callbacks.remove(self._on_collection)
        GCPauses._installed = None
        self._schedule = None
        if self._freezes:
            gc.unfreeze()
            self._baseline = None
            self._frozen = 0

    def statistics(self) -> GCPauseStatistics:
        """The pauses so far, and what was frozen."""
        return GCPauseStatistics(
            full_collections=self._full,
            last_pause=self._last,
            longest_pause=self._longest,
            total_pause=self._total,
            freezes=self._freezes,
            thaws=self._thaws,
            frozen=self._frozen,
        )

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Called by the collector, in whichever thread allocated: no allocation-heavy work,
        # and never an exception (it would be printed as unraisable).
        if info.get("generation") != _OLDEST:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # installed while this collection ran
            return
        pause = time.perf_counter() - self._started
        self._started = None
        self._full += 1
        self._last = pause
        self._total += pause
        self._longest = max(self._longest, pause)
        schedule = self._schedule
        if self.freeze and not self._pending and schedule is not None:
            self._pending = True
            try:
                schedule(self._after_full)
            except Exception:  # the loop is closed or closing: nothing left to serve
                self._pending = False

    def _after_full(self) -> None:
        """In the loop, after a full collection: freeze its survivors; thaw if they grew."""
        self._pending = False
        if GCPauses._installed is not self:
            return
        gc.freeze()
        self._freezes += 1
        # A walk of the permanent generation: about 10 ms per million objects, a small
        # fraction of the full collection that it replaces.
        frozen = self._frozen = gc.get_freeze_count()
        if self._baseline is None:
            self._baseline = frozen
        elif frozen > self.regrow * self._baseline:
            # Thaw and collect the whole heap now, while the loop is stopped for this
            # already: it frees any cycle that was frozen while reachable. That collection
            # schedules the freeze that sets the next baseline.
            gc.unfreeze()
            self._thaws += 1
            self._baseline = None
            self._frozen = 0
            gc.collect()


def _loop_scheduler() -> Callable[[Callable[[], None]], object]:
    """A thread-safe way to run a callback in the running event loop (asyncio or trio)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    outside = "GCPauses must be installed inside a running asyncio or trio loop"
    try:
        import trio
    except ImportError:  # pragma: no cover - no trio, and no asyncio loop running
        raise RuntimeError(outside) from None
    try:
        return trio.lowlevel.current_trio_token().run_sync_soon
    except RuntimeError:
        raise RuntimeError(outside) from None
