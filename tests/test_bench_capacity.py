"""The capacity model's arithmetic, on figures given by hand."""

from __future__ import annotations

from typing import Any

import pytest

from bench.capacity import Figures, Target, figures_from, plan, report


def figures(**changes: float) -> Figures:
    values = {
        "dense_us": 3.0, "rooms_us": 15.0, "idle_kib": 30.0, "redis_us": 40.0,
        "redis_read_us": 0.0, "delivery_extra_us": 0.0, "read_us": 10.0,
    }  # fmt: skip
    values.update(changes)
    return Figures(envelope_bytes=240, sources=dict.fromkeys(values, "test"), **values)


def test_small_rooms_need_cpu_for_deliveries_and_for_each_node_that_reads_a_publish() -> None:
    target = Target(connections=1_000_000, deliveries_per_s=500_000, room_size=20)
    grouped = plan(figures(), target, "grouped")
    assert (grouped.publishes_per_s, grouped.readers) == (25_000, 1.0)
    # Deliveries: 500k x 15 us = 7.5 cores, at 50% 15; reads: 25k x 10 us at 50% 0.5: 8 nodes.
    assert grouped.nodes == 8
    assert grouped.redis_shards == 2  # 25k x 40 us = one thread, at 50%: 2
    spread = plan(figures(), target, "spread")
    # Members at random over n nodes: n(1 - (1 - 1/n)^20) readers; found at a fixed point.
    n = spread.nodes
    assert spread.readers == pytest.approx(n * (1 - (1 - 1 / n) ** 20))
    cores = 15 + 25_000 * spread.readers * 10e-6 / 0.5
    assert n == -(-cores // 2)
    assert spread.nodes > grouped.nodes
    assert plan(figures(rooms_us=30.0), target, "grouped").nodes > grouped.nodes


def test_one_dense_room_is_bound_by_memory_and_its_hot_room_limit_by_one_shard() -> None:
    target = Target(connections=1_000_000, deliveries_per_s=500_000)
    dense = plan(figures(idle_kib=64.0), target, "dense")
    assert dense.nodes_for_memory == 4  # 1M x 64 KiB = 61 GiB over 16 GiB nodes
    assert dense.nodes == max(dense.nodes_for_cpu, 4)
    assert dense.readers == dense.nodes  # every node has members
    assert dense.hot_room_limit_per_s == 12_500  # 50% of one thread at 40 us a publish
    costly = plan(figures(idle_kib=64.0, redis_read_us=10.0), target, "dense")
    assert costly.hot_room_limit_per_s == pytest.approx(5e5 / (40 + 10 * (costly.readers - 1)))


def row(scenario: str, clients: int, cpu: float, **extra: Any) -> dict[str, Any]:
    return {
        "server": "chat", "scenario": scenario, "backend": "memory", "clients": clients,
        "rooms": 1, "nodes": 1, "error": "", "cpu_us_per_delivery": cpu,
        "idle_kib_per_connection": 20.0, "sent": 1000, "redis_cpu_s": 0.0,
    } | extra  # fmt: skip


def test_the_redis_terms_are_fitted_from_two_room_sizes() -> None:
    # Made to fit d = 2 us per delivery and r = 100 us per publish read.
    results = {
        "results": [
            row("fanout", 500, 3.0),
            row("rooms", 1000, 12.0, rooms=50),
            row("redis", 500, 3.0 + 2 + 100 / 500, backend="redis", redis_cpu_s=0.05),
            row("redis", 500, 6.0, backend="redis", nodes=2, redis_cpu_s=0.08),
            row("redis-rooms", 1000, 12.0 + 2 + 100 / 20, backend="redis", rooms=50),
        ]
    }
    measured = figures_from(results)
    assert measured.delivery_extra_us == pytest.approx(2.0)
    assert measured.read_us == pytest.approx(100.0)
    assert measured.redis_us == pytest.approx(50.0)
    assert measured.redis_read_us == pytest.approx(30.0)
    assert measured.sources["read_us"] == "fitted: redis vs memory, one room of 500 and rooms of 20"


def test_missing_runs_are_assumed_and_said_so() -> None:
    measured = figures_from({"results": [row("fanout", 500, 2.5)]})
    assert (measured.dense_us, measured.idle_kib) == (2.5, 20.0)
    assert measured.sources["dense_us"] == "chat, fan-out, 500 subscribers"
    assert measured.sources["read_us"].startswith("assumed")
    assert "assumed" in report(measured, Target())
