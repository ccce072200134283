"""A capacity model from the latest benchmark results: how many app nodes and Redis shards a
target load needs, and where the model stops holding.

Run ``python -m bench.capacity`` after ``python -m bench --servers chat --scenario
fanout,rooms,redis,redis-rooms`` (it reads ``bench/results/latest.json``, which each run of
the bench overwrites: one invocation must measure every row); the figures move when the code
gets faster. Every input is a figure measured by the benchmark on this machine, or a stated
assumption printed beside the result, so that the arithmetic can be checked by hand. See
docs/scaling.md for the reasoning.

The model of one app node on Redis: CPU = deliveries x (in-memory cost per delivery + Redis's
extra per delivery) + publishes it reads x cost per publish read. The two Redis terms are
fitted from two runs on one Redis node that differ in room size (one room of 500, rooms of
20): the extra cost per delivery over the in-memory run of the same shape is
``d + r / room size``, two equations for ``d`` and ``r``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsbroadcast.envelope import Draft

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

FALLBACKS = {
    "dense_us": 3.0,
    "rooms_us": 15.0,
    "idle_kib": 30.0,
    "redis_us": 50.0,
    "redis_read_us": 30.0,
    "delivery_extra_us": 2.6,
    "read_us": 150.0,
}
"""Figures used when the results hold no run that measures them (printed as assumed)."""


@dataclass(frozen=True)
class Figures:
    """What one node and one Redis cost, as measured (or assumed where no run measured it)."""

    dense_us: float
    """App CPU µs per delivery, one big room, in memory (fan-out scenario, largest run)."""
    rooms_us: float
    """App CPU µs per delivery, many small rooms, in memory (rooms scenario)."""
    idle_kib: float
    """Memory per idle connection, KiB."""
    redis_us: float
    """Redis CPU µs per publish read by one node (the ordering script, the log, one read)."""
    redis_read_us: float
    """Redis CPU µs per publish for each further node that reads it."""
    delivery_extra_us: float
    """App CPU µs per delivery that Redis adds over the in-memory backend."""
    read_us: float
    """App CPU µs per publish a node reads from Redis (its read, decode and fan-out entry),
    whatever the number of local members."""
    envelope_bytes: int
    """Bytes of a typical chat envelope on the wire (a 40-character message)."""
    sources: dict[str, str]
    """Where each figure comes from."""


@dataclass(frozen=True)
class Target:
    connections: int = 1_000_000
    deliveries_per_s: float = 500_000
    room_size: int = 20
    """Members per room in the many-small-rooms case."""
    cores_per_node: int = 2
    memory_per_node_gib: float = 16.0
    cpu_target: float = 0.5
    """Fraction of each core the plan uses, leaving headroom for bursts and reconnect storms."""
    redis_cpu_target: float = 0.5
    """Fraction of a Redis core (Redis runs commands on one thread) the plan uses per shard."""


def typical_envelope_bytes() -> int:
    draft = Draft("message", "chat:lobby", "alice", {"message": "x" * 40})
    return draft.envelope(123_456, "4f9c2a1b").size


def _rows(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and not r["error"]]


def _largest(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return max(_rows(rows, **match), key=lambda r: r["clients"], default=None)


def figures_from(results: dict[str, Any]) -> Figures:
    """The model's inputs from a benchmark result file (``latest.json``)."""
    rows: list[dict[str, Any]] = results.get("results", [])
    sources: dict[str, str] = {}
    values: dict[str, float] = {}

    def take(name: str, value: float | None, how: str) -> None:
        if value is not None and value > 0:
            values[name] = value
            sources[name] = how
        else:
            values[name] = FALLBACKS[name]
            sources[name] = "assumed (no run measured it)"

    dense = _largest(rows, server="chat", scenario="fanout", backend="memory")
    take(
        "dense_us",
        dense and dense["cpu_us_per_delivery"],
        (dense and f"chat, fan-out, {dense['clients']} subscribers") or "",
    )
    take(
        "idle_kib",
        dense and dense["idle_kib_per_connection"],
        (dense and f"chat, {dense['clients']} idle connections") or "",
    )
    rooms = _largest(rows, server="chat", scenario="rooms", backend="memory")
    take(
        "rooms_us",
        rooms and rooms["cpu_us_per_delivery"],
        (rooms and f"chat, {rooms['clients']} subscribers in {rooms['rooms']} rooms") or "",
    )
    one = next(iter(_rows(rows, server="chat", scenario="redis", nodes=1)), None)
    two = next(iter(_rows(rows, server="chat", scenario="redis", nodes=2)), None)
    small = next(iter(_rows(rows, server="chat", scenario="redis-rooms")), None)
    redis_us = one and one["sent"] and 1e6 * one["redis_cpu_s"] / one["sent"]
    take("redis_us", redis_us, "redis-server's CPU / publishes, one node reading")
    extra_reader = (
        two
        and one
        and two["sent"]
        and redis_us
        and 1e6 * two["redis_cpu_s"] / two["sent"] - redis_us
    )
    take("redis_read_us", extra_reader, "redis-server's CPU, two nodes minus one, per publish")
    # The Redis rows' extra cost per delivery over the in-memory rows of the same shape.
    matching = _rows(rows, server="chat", scenario="fanout", backend="memory")
    same = next((r for r in matching if one and r["clients"] == one["clients"]), None)
    delivery_extra = read = None
    if one and same and small and rooms:
        size_dense = one["clients"]
        size_small = small["clients"] / max(1, small["rooms"])
        extra_dense = one["cpu_us_per_delivery"] - same["cpu_us_per_delivery"]
        extra_small = small["cpu_us_per_delivery"] - rooms["cpu_us_per_delivery"]
        read = (extra_small - extra_dense) / (1 / size_small - 1 / size_dense)
        delivery_extra = extra_dense - read / size_dense
    how = "fitted: redis vs memory, one room of {} and rooms of {}"
    sizes = (one["clients"], small["clients"] // max(1, small["rooms"])) if one and small else ()
    take("read_us", read, how.format(*sizes) if sizes else "")
    take("delivery_extra_us", delivery_extra, how.format(*sizes) if sizes else "")
    return Figures(
        envelope_bytes=typical_envelope_bytes(),
        sources=sources,
        **values,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Plan:
    case: str
    publishes_per_s: float
    readers: float
    """Nodes that read each publish."""
    nodes_for_cpu: int
    nodes_for_memory: int
    nodes: int
    redis_shards: int
    egress_mib_per_s_per_node: float
    hot_room_limit_per_s: float
    """The most publishes per second one room takes: its script runs on one shard's thread."""


def _ceil(value: float) -> int:
    return math.ceil(value - 1e-9)  # 117.00000000000001 is 117


def plan(figures: Figures, target: Target, case: str) -> Plan:
    """Nodes and shards for ``target``: ``"dense"`` (everyone in one room), ``"spread"``
    (rooms of ``room_size`` whose members land on nodes at random) or ``"grouped"`` (each
    room's members on one node)."""
    dense = case == "dense"
    members = target.connections if dense else target.room_size
    publishes = target.deliveries_per_s / members
    per_delivery = (figures.dense_us if dense else figures.rooms_us) + figures.delivery_extra_us
    memory_nodes = _ceil(
        target.connections * figures.idle_kib / (target.memory_per_node_gib * 1024 * 1024)
    )
    delivery_cores = target.deliveries_per_s * per_delivery / 1e6 / target.cpu_target

    def readers(nodes: int) -> float:
        if dense:
            return nodes
        if case == "grouped":
            return 1.0
        # Distinct nodes among a room's members placed at random over ``nodes``.
        return nodes * (1 - (1 - 1 / nodes) ** target.room_size)

    nodes = max(memory_nodes, 1)
    for _ in range(100):  # to a fixed point: more nodes, more readers per publish
        read_cores = publishes * readers(nodes) * figures.read_us / 1e6 / target.cpu_target
        needed = max(memory_nodes, _ceil((delivery_cores + read_cores) / target.cores_per_node))
        if needed <= nodes:
            break
        nodes = needed
    cpu_nodes = _ceil((delivery_cores + read_cores) / target.cores_per_node)
    redis_per_publish = figures.redis_us + (readers(nodes) - 1) * figures.redis_read_us
    shards = max(1, _ceil(publishes * redis_per_publish / 1e6 / target.redis_cpu_target))
    egress = target.deliveries_per_s * figures.envelope_bytes / nodes / (1024 * 1024)
    names = {"dense": "one dense room", "spread": f"rooms of {target.room_size}, spread"}
    return Plan(
        case=names.get(case, f"rooms of {target.room_size}, grouped"),
        publishes_per_s=publishes,
        readers=readers(nodes),
        nodes_for_cpu=cpu_nodes,
        nodes_for_memory=memory_nodes,
        nodes=nodes,
        redis_shards=shards,
        egress_mib_per_s_per_node=egress,
        hot_room_limit_per_s=1e6 * target.redis_cpu_target / redis_per_publish,
    )


def report(figures: Figures, target: Target) -> str:
    s = figures.sources
    lines = [
        "## Inputs",
        "",
        "| figure | value | from |",
        "|---|---|---|",
        f"| app CPU per delivery, one dense room, in memory | {figures.dense_us:.2f} µs"
        f" | {s['dense_us']} |",
        f"| app CPU per delivery, small rooms, in memory | {figures.rooms_us:.2f} µs"
        f" | {s['rooms_us']} |",
        f"| app CPU per delivery added by Redis | {figures.delivery_extra_us:.2f} µs"
        f" | {s['delivery_extra_us']} |",
        f"| app CPU per publish read from Redis, per node | {figures.read_us:.0f} µs"
        f" | {s['read_us']} |",
        f"| Redis CPU per publish, one reader | {figures.redis_us:.0f} µs | {s['redis_us']} |",
        f"| Redis CPU per publish per further reader | {figures.redis_read_us:.0f} µs"
        f" | {s['redis_read_us']} |",
        f"| memory per idle connection | {figures.idle_kib:.1f} KiB | {s['idle_kib']} |",
        f"| bytes per envelope | {figures.envelope_bytes} | a 40-character chat message |",
        "",
        f"Target: {target.connections:,} connections, {target.deliveries_per_s:,.0f}"
        f" deliveries/s; nodes of {target.cores_per_node} cores and"
        f" {target.memory_per_node_gib:g} GiB used to {target.cpu_target:.0%} of their CPU;"
        f" Redis shards used to {target.redis_cpu_target:.0%} of their one thread.",
        "",
        "## Plan",
        "",
        "| case | publishes/s | readers per publish | nodes (CPU) | nodes (memory) | **nodes**"
        " | **Redis shards** | egress per node | most publishes/s in one room |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in ("dense", "spread", "grouped"):
        p = plan(figures, target, case)
        lines.append(
            f"| {p.case} | {p.publishes_per_s:,.1f} | {p.readers:.1f} | {p.nodes_for_cpu}"
            f" | {p.nodes_for_memory} | **{p.nodes}** | **{p.redis_shards}**"
            f" | {p.egress_mib_per_s_per_node:.1f} MiB/s | {p.hot_room_limit_per_s:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--connections", type=int, default=Target.connections)
    parser.add_argument("--deliveries", type=float, default=Target.deliveries_per_s)
    parser.add_argument("--room-size", type=int, default=Target.room_size)
    parser.add_argument("--cores-per-node", type=int, default=Target.cores_per_node)
    parser.add_argument("--memory-per-node", type=float, default=Target.memory_per_node_gib)
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except FileNotFoundError:
        results = {}
        print(f"no results at {args.results}: every figure is assumed", file=sys.stderr)
    target = Target(
        connections=args.connections,
        deliveries_per_s=args.deliveries,
        room_size=args.room_size,
        cores_per_node=args.cores_per_node,
        memory_per_node_gib=args.memory_per_node,
    )
    sys.stdout.write(report(figures_from(results), target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
