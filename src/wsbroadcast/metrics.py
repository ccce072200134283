"""A Prometheus collector over a `ConnectionManager`'s statistics.

Needs the ``prometheus`` extra (``pip install wsbroadcast[prometheus]``); the rest of
wsbroadcast never imports this module or ``prometheus_client``::

    from prometheus_client import REGISTRY
    from wsbroadcast.metrics import ManagerCollector

    REGISTRY.register(ManagerCollector(manager))

Each scrape reads `statistics` and the backend's
``health()``: nothing is counted twice and nothing runs between scrapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .gcpauses import GCPauses

if TYPE_CHECKING:
    from .backends.base import BackendHealth
    from .manager import ConnectionManager

__all__ = [
    "BACKEND_METRICS",
    "GC_METRICS",
    "MANAGER_METRICS",
    "GCPausesCollector",
    "ManagerCollector",
]

_Kind = Literal["counter", "gauge"]

MANAGER_METRICS: Final[tuple[tuple[str, _Kind, str], ...]] = (
    ("connections", "gauge", "Open connections, connecting ones included."),
    ("rooms", "gauge", "Rooms with at least one local connection."),
    ("published", "counter", "Envelopes published (broadcasts, joins and leaves)."),
    ("delivered", "counter", "Frames written to sockets."),
    ("dropped", "counter", "Frames queued for a connection but never written."),
    ("slow_consumer_disconnects", "counter",
     "Connections closed with 4008 because their queue was full."),
    ("send_failures", "counter", "Connections closed because a send to them failed."),
    ("departures_lost", "counter",
     "Departures the backend could not record in time (presence and leave may lag)."),
    ("close_timeouts", "counter",
     "Sockets whose close did not finish within the manager's close timeout."),
)  # fmt: skip
"""Every field of `ManagerStatistics`: (field, type, help)."""

BACKEND_METRICS: Final[tuple[tuple[str, _Kind, str], ...]] = (
    ("reconnects", "counter", "Times the backend reached its broker again after an outage."),
    ("publish_failures", "counter", "Publishes the broker could not take."),
    ("data_losses", "counter", "Times the broker came back without its data."),
    ("resets", "counter", "Stream resets (history_lost) told to this node's rooms."),
    ("gaps", "counter",
     "Times this node found envelopes trimmed from history before it could read them."),
    ("reaped_nodes", "counter", "Dead nodes whose presence this node removed."),
    ("rooms", "gauge", "Rooms this node reads from the broker."),
)  # fmt: skip
"""Integer fields of the backend's ``health()`` exported when present (the Redis backend has
them all): (key, type, help). Their metric keys are ``backend_`` + key."""


def _health_fields(health: BackendHealth | Mapping[str, object]) -> Mapping[str, object]:
    """The fields of a backend's `health()`; a backend of an older release returns a dict."""
    if isinstance(health, Mapping):
        warnings.warn(
            "a Backend.health() that returns a dict is deprecated: return a BackendHealth",
            DeprecationWarning,
            stacklevel=3,
        )
        return health
    return vars(health)


def _metric_keys() -> tuple[str, ...]:
    return (
        *(key for key, _, _ in MANAGER_METRICS),
        "backend_up",
        *(f"backend_{key}" for key, _, _ in BACKEND_METRICS),
    )


class ManagerCollector:
    """A ``prometheus_client`` custom collector for one manager and its backend.

    Reports every field of `statistics`, ``backend_up``
    (1 while ``manager.backend.health().ok``, else 0) and the integer
    counters and gauges of `BACKEND_METRICS` that ``health()`` reports. A metric is
    named ``{prefix}_{key}`` (counters get ``_total`` from ``prometheus_client``): e.g.
    ``wsbroadcast_connections``, ``wsbroadcast_delivered_total``, ``wsbroadcast_backend_up``,
    ``wsbroadcast_backend_reconnects_total``. While the manager is not running only
    ``backend_up`` is reported, as 0.

    :param prefix: the start of every metric name.
    :param names: full metric names for some keys (a field of ``ManagerStatistics``,
        ``backend_up`` or ``backend_`` + a key of `BACKEND_METRICS`), instead of
        ``{prefix}_{key}``; for counters, ``_total`` may be given or left off.
    """

    def __init__(
        self,
        manager: ConnectionManager,
        prefix: str = "wsbroadcast",
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        names = dict(names or {})
        unknown = set(names) - set(_metric_keys())
        if unknown:
            raise ValueError(f"unknown metric keys: {', '.join(sorted(unknown))}")
        self.manager = manager
        self._names = {key: names.get(key, f"{prefix}_{key}") for key in _metric_keys()}

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may report, empty (for a registry's name checks)."""
        for key, kind, help in MANAGER_METRICS:
            yield self._family(key, kind, help, None)
        yield self._up(None)
        for key, kind, help in BACKEND_METRICS:
            yield self._family(f"backend_{key}", kind, help, None)

    def collect(self) -> Iterator[Metric]:
        """The current values; never raises for a manager that is not running."""
        manager = self.manager
        if not manager.running:
            yield self._up(0)
            return
        statistics = manager.statistics()
        health = _health_fields(manager.backend.health())
        for key, kind, help in MANAGER_METRICS:
            yield self._family(key, kind, help, getattr(statistics, key))
        yield self._up(int(health.get("status") == "ok"))
        for key, kind, help in BACKEND_METRICS:
            value = health.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                yield self._family(f"backend_{key}", kind, help, value)

    def _up(self, value: int | None) -> Metric:
        return self._family("backend_up", "gauge", "1 while the backend is healthy, else 0.", value)

    def _family(self, key: str, kind: _Kind, help: str, value: int | None) -> Metric:
        return _family(self._names[key], kind, help, value)


GC_METRICS: Final[tuple[tuple[str, str, _Kind, str], ...]] = (
    ("full_collections", "gc_full_collections", "counter",
     "Full garbage collections (each stops the event loop while it runs)."),
    ("total_pause", "gc_pause_seconds", "counter", "Seconds spent in full garbage collections."),
    ("longest_pause", "gc_longest_pause_seconds", "gauge",
     "Seconds the longest full garbage collection took."),
    ("last_pause", "gc_last_pause_seconds", "gauge",
     "Seconds the last full garbage collection took."),
    ("freezes", "gc_freezes", "counter", "Times the survivors of a full collection were frozen."),
    ("thaws", "gc_thaws", "counter", "Times the permanent generation was thawed, having grown."),
    ("frozen", "gc_frozen_objects", "gauge",
     "Objects in the permanent generation after the last freeze."),
)  # fmt: skip
"""Every field of `GCPauseStatistics`: (field, name after the prefix, type, help)."""


class GCPausesCollector:
    """A ``prometheus_client`` custom collector for the process's `GCPauses`.

    Reports every field of `GCPauseStatistics`, named as `GC_METRICS` says after
    ``{prefix}_`` (counters get ``_total``): ``wsbroadcast_gc_full_collections_total``,
    ``wsbroadcast_gc_pause_seconds_total``, ``wsbroadcast_gc_longest_pause_seconds``,
    ``wsbroadcast_gc_frozen_objects``... Nothing while none is installed.

    :param pauses: the one to report; None (the default): whichever is installed at each
        scrape (`GCPauses.current`).
    """

    def __init__(self, pauses: GCPauses | None = None, prefix: str = "wsbroadcast") -> None:
        self.pauses = pauses
        self._prefix = prefix

    def describe(self) -> Iterator[Metric]:
        """Every family this collector may report, empty (for a registry's name checks)."""
        for _, name, kind, help in GC_METRICS:
            yield _family(f"{self._prefix}_{name}", kind, help, None)

    def collect(self) -> Iterator[Metric]:
        """The current values; nothing while no `GCPauses` is installed."""
        pauses = self.pauses if self.pauses is not None else GCPauses.current()
        if pauses is None:
            return
        statistics = pauses.statistics()
        for field, name, kind, help in GC_METRICS:
            yield _family(f"{self._prefix}_{name}", kind, help, getattr(statistics, field))


def _family(name: str, kind: _Kind, help: str, value: float | None) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, help, value=value)
    return GaugeMetricFamily(name, help, value=value)
