"""wsbroadcast.metrics: the prometheus_client collector over a manager's stats."""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from tests.faults import stall_one_of_two
from wsbroadcast import BackendHealth, CloseCode, ConnectionManager
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.gcpauses import GCPauses
from wsbroadcast.metrics import (
    BACKEND_METRICS,
    GC_METRICS,
    MANAGER_METRICS,
    GCPausesCollector,
    ManagerCollector,
)
from wsbroadcast.testing import MemoryTransport

pytestmark = pytest.mark.anyio


def values(collector: ManagerCollector | GCPausesCollector) -> dict[str, tuple[str, float]]:
    """{sample name: (family type, value)} of one scrape; every sample is unlabelled."""
    result = {}
    for family in collector.collect():
        for sample in family.samples:
            assert sample.labels == {}
            result[sample.name] = (family.type, sample.value)
    return result


def expected(manager: ConnectionManager) -> dict[str, tuple[str, float]]:
    """What the collector should report for ``manager``'s stats (a memory backend)."""
    kinds = {key: kind for key, kind, _ in MANAGER_METRICS}
    result: dict[str, tuple[str, float]] = {
        f"wsbroadcast_{key}" + ("_total" if kinds[key] == "counter" else ""): (kinds[key], value)
        for key, value in dataclasses.asdict(manager.statistics()).items()
    }
    result["wsbroadcast_backend_up"] = ("gauge", 1)
    return result


async def test_values_match_stats_after_connects_broadcasts_and_a_slow_consumer_close() -> None:
    async with ConnectionManager(queue_size=8) as manager:
        collector = ManagerCollector(manager)
        assert values(collector) == expected(manager)
        stalled, _, _ = await stall_one_of_two(manager)
        assert stalled.close_code == CloseCode.SLOW_CONSUMER

        got = values(collector)
        assert got == expected(manager)
        assert got["wsbroadcast_connections"] == ("gauge", 1)
        assert got["wsbroadcast_rooms"] == ("gauge", 1)
        assert got["wsbroadcast_slow_consumer_disconnects_total"] == ("counter", 1)
        assert got["wsbroadcast_published_total"][1] >= 22  # 20 messages and 2 joins
        assert got["wsbroadcast_dropped_total"][1] >= 8
        assert got["wsbroadcast_delivered_total"][1] >= 22


async def test_the_text_exposition_has_every_name_once_and_no_created_series() -> None:
    async with ConnectionManager() as manager:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(ManagerCollector(manager))
        await manager.connect(MemoryTransport(), "alice")
        text = generate_latest(registry).decode()
    assert "_created" not in text
    assert "# TYPE wsbroadcast_connections gauge\nwsbroadcast_connections 1.0\n" in text
    assert "# TYPE wsbroadcast_published_total counter\nwsbroadcast_published_total 1.0\n" in text
    assert "# TYPE wsbroadcast_backend_up gauge\nwsbroadcast_backend_up 1.0\n" in text
    samples = [line.split()[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(samples) == len(set(samples)) == len(MANAGER_METRICS) + 1


async def test_a_manager_that_is_not_running_reports_only_backend_down() -> None:
    manager = ConnectionManager()
    collector = ManagerCollector(manager)
    assert values(collector) == {"wsbroadcast_backend_up": ("gauge", 0)}
    async with manager:
        assert values(collector)["wsbroadcast_backend_up"] == ("gauge", 1)
    assert values(collector) == {"wsbroadcast_backend_up": ("gauge", 0)}


@dataclasses.dataclass(frozen=True)
class _Health(BackendHealth):
    connected: bool
    reconnects: int
    rooms: int
    gaps: str
    unknown: int


class _Backend(MemoryBackend):
    """A memory backend whose health() says what the test sets."""

    def __init__(self, report: BackendHealth) -> None:
        super().__init__()
        self.report = report

    def health(self) -> BackendHealth:
        return self.report


async def test_backend_health_counters_are_reported_when_present() -> None:
    backend = _Backend(
        _Health(
            status="degraded",
            backend="_Backend",
            connected=False,  # a bool, never a metric
            reconnects=3,
            rooms=2,
            gaps="many",  # not an integer: left out
            unknown=7,  # not a known key: left out
        )
    )
    async with ConnectionManager(backend) as manager:
        got = values(ManagerCollector(manager, prefix="chat"))
    assert got["chat_backend_up"] == ("gauge", 0)
    assert got["chat_backend_reconnects_total"] == ("counter", 3)
    assert got["chat_backend_rooms"] == ("gauge", 2)
    assert not {name for name in got if "gaps" in name or "unknown" in name or "connected" in name}


def test_names_override_the_prefix_and_unknown_keys_are_refused() -> None:
    collector = ManagerCollector(
        ConnectionManager(), "chat", names={"delivered": "chat_deliveries", "backend_up": "x_up"}
    )
    described = {family.name: family.type for family in collector.describe()}
    # prometheus_client keeps a counter's name without "_total"; the exposition adds it.
    assert described["chat_deliveries"] == "counter"
    assert described["x_up"] == "gauge"
    assert described["chat_connections"] == "gauge"
    assert described["chat_backend_rooms"] == "gauge"
    assert len(described) == len(MANAGER_METRICS) + 1 + len(BACKEND_METRICS)
    assert all(isinstance(family, Metric) and not family.samples for family in collector.describe())
    with pytest.raises(ValueError, match="deliverd"):
        ManagerCollector(ConnectionManager(), names={"deliverd": "x"})


def test_the_core_does_not_import_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import wsbroadcast, wsbroadcast.testing, wsbroadcast.backends.memory\n"
        "assert 'wsbroadcast.metrics' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_gc_pauses_are_reported_for_whichever_is_installed() -> None:
    collector = GCPausesCollector()
    assert values(collector) == {}
    enabled = gc.isenabled()
    gc.disable()  # only this test's collection: the figures must not move between reads
    try:
        async with GCPauses(freeze=False) as pauses:
            gc.collect()
            statistics = dataclasses.asdict(pauses.statistics())
            assert statistics["full_collections"] == 1
            expected = {
                f"wsbroadcast_{name}" + ("_total" if kind == "counter" else ""): (
                    kind,
                    statistics[field],
                )
                for field, name, kind, _ in GC_METRICS
            }
            assert set(statistics) == {field for field, *_ in GC_METRICS}
            assert values(collector) == expected
            assert values(GCPausesCollector(pauses)) == expected
            assert "wsbroadcast_gc_pause_seconds_total" in expected
            registry = CollectorRegistry()
            registry.register(GCPausesCollector(prefix="chat"))
            text = generate_latest(registry).decode()
            assert "chat_gc_longest_pause_seconds " in text
    finally:
        if enabled:
            gc.enable()
    assert values(collector) == {}
