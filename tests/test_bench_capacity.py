"""The capacity model's arithmetic, on figures given by hand."""

from __future__ import annotations

from typing import Any

from bench.capacity import Figures, Target, figures_from, plan, report


def figures(**changes: float) -> Figures:
    values = {"dense_us": 3.0, "rooms_us": 15.0, "idle_kib": 30.0, "redis_us": 40.0}
    values.update(changes)
    sources = dict.fromkeys((*values, "node_read_us"), "test")
    return Figures(node_read_us=10.0, envelope_bytes=240, sources=sources, **values)


def test_small_rooms_need_cpu_and_shards_in_proportion_to_the_load() -> None:
    target = Target(connections=1_000_000, deliveries_per_s=500_000, room_size=20)
    small = plan(figures(), target, dense=False)
    assert small.publishes_per_s == 25_000
    # Deliveries: 500k x 15 us = 7.5 cores, at 50% 15 cores, 8 nodes; reads: each publish
    # read by min(20, 8) nodes, 25k x 8 x 10 us at 50% = 4 cores: 19 cores, 10 nodes.
    assert small.nodes_for_cpu == 10
    assert small.redis_shards == 2  # 25k x 40 us = one thread, at 50%: 2
    doubled = plan(figures(rooms_us=30.0), target, dense=False)
    assert doubled.nodes > small.nodes


def test_one_dense_room_is_bound_by_memory_and_its_hot_room_limit_by_one_shard() -> None:
    target = Target(connections=1_000_000, deliveries_per_s=500_000)
    dense = plan(figures(idle_kib=64.0), target, dense=True)
    assert dense.nodes_for_memory == 4  # 1M x 64 KiB = 61 GiB over 16 GiB nodes
    assert dense.nodes == max(dense.nodes_for_cpu, 4)
    assert dense.hot_room_limit_per_s == 12_500  # 50% of one thread at 40 us a publish


def test_missing_runs_are_assumed_and_said_so() -> None:
    row: dict[str, Any] = {
        "server": "chat", "scenario": "fanout", "backend": "memory", "clients": 500,
        "error": "", "cpu_us_per_delivery": 2.5, "idle_kib_per_connection": 20.0,
    }  # fmt: skip
    measured = figures_from({"results": [row]})
    assert (measured.dense_us, measured.idle_kib) == (2.5, 20.0)
    assert measured.sources["dense_us"] == "chat, fan-out, 500 subscribers"
    assert measured.sources["redis_us"].startswith("assumed")
    assert "assumed" in report(measured, Target())
