"""A capacity model from the latest benchmark results: how many app nodes and Redis shards a
target load needs, and where the model stops holding.

Run ``python -m bench.capacity`` after ``python -m bench`` (it reads
``bench/results/latest.json``); the figures move when the code gets faster. Every input is a
figure measured by the benchmark on this machine, or a stated assumption printed beside the
result, so that the arithmetic can be checked by hand. See docs/scaling.md for the reasoning.
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
    "redis_us": 40.0,
    "node_read_us": 15.0,
}
"""Figures used when the results hold no run that measures them (printed as assumed)."""


@dataclass(frozen=True)
class Figures:
    """What one node and one Redis cost, as measured (or assumed where no run measured it)."""

    dense_us: float
    """App CPU µs per delivery, one big room (fan-out scenario, largest run)."""
    rooms_us: float
    """App CPU µs per delivery, many small rooms (rooms scenario)."""
    idle_kib: float
    """Memory per idle connection, KiB."""
    redis_us: float
    """Redis CPU µs per publish (the ordering script, the log, the reads by the nodes)."""
    node_read_us: float
    """App CPU µs per publish a node reads from Redis (decode and fan-out entry), before
    any delivery."""
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


def _pick(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    chosen = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and not r["error"]]
    return max(chosen, key=lambda r: r["clients"], default=None)


def figures_from(results: dict[str, Any]) -> Figures:
    """The model's inputs from a benchmark result file (``latest.json``)."""
    rows: list[dict[str, Any]] = results.get("results", [])
    sources: dict[str, str] = {}
    values: dict[str, float] = {}

    def take(name: str, row: dict[str, Any] | None, value: float | None, how: str) -> None:
        if row is not None and value is not None and value > 0:
            values[name] = value
            sources[name] = how.format(**row)
        else:
            values[name] = FALLBACKS[name]
            sources[name] = "assumed (no run measured it)"

    dense = _pick(rows, server="chat", scenario="fanout", backend="memory")
    take(
        "dense_us",
        dense,
        dense and dense["cpu_us_per_delivery"],
        "chat, fan-out, {clients} subscribers",
    )
    take(
        "idle_kib",
        dense,
        dense and dense["idle_kib_per_connection"],
        "chat, {clients} idle connections",
    )
    rooms = _pick(rows, server="chat", scenario="rooms", backend="memory")
    take(
        "rooms_us",
        rooms,
        rooms and rooms["cpu_us_per_delivery"],
        "chat, {clients} subscribers in {rooms} rooms",
    )
    redis = _pick(rows, server="chat", scenario="redis")
    sent = redis["sent"] if redis else 0
    take(
        "redis_us",
        redis,
        redis and sent and 1e6 * redis["redis_cpu_s"] / sent,
        "chat on Redis, {nodes} nodes, {clients} subscribers",
    )
    # A node's cost per publish read from Redis: what the Redis run costs per delivery
    # beyond the in-memory run at the same size, times the deliveries per publish per node.
    if redis and dense and sent:
        per_node = redis["deliveries"] / sent / max(1, redis["nodes"])
        extra = (redis["cpu_us_per_delivery"] - dense["cpu_us_per_delivery"]) * per_node
        take("node_read_us", redis, extra, "chat on Redis minus in-memory, per publish read")
    else:
        take("node_read_us", None, None, "")
    return Figures(
        envelope_bytes=typical_envelope_bytes(),
        sources=sources,
        **values,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Plan:
    case: str
    publishes_per_s: float
    nodes_for_cpu: int
    nodes_for_memory: int
    nodes: int
    redis_shards: int
    egress_mib_per_s_per_node: float
    hot_room_limit_per_s: float
    """The most publishes per second one room takes: its script runs on one shard's thread."""


def plan(figures: Figures, target: Target, dense: bool) -> Plan:
    """Nodes and shards for ``target`` with every connection in one room (``dense``) or in
    rooms of ``target.room_size``."""
    members = target.connections if dense else target.room_size
    publishes = target.deliveries_per_s / members
    per_delivery = figures.dense_us if dense else figures.rooms_us
    memory_nodes = math.ceil(
        target.connections * figures.idle_kib / (target.memory_per_node_gib * 1024 * 1024)
    )
    cores_for_deliveries = target.deliveries_per_s * per_delivery / 1e6 / target.cpu_target
    nodes = max(memory_nodes, math.ceil(cores_for_deliveries / target.cores_per_node), 1)
    # Every node with a member of a room reads each of its publishes: in one dense room, all
    # of them; in small rooms spread at random, about min(room size, nodes) per publish.
    readers = nodes if dense else min(target.room_size, nodes)
    read_cores = publishes * readers * figures.node_read_us / 1e6 / target.cpu_target
    nodes = max(nodes, math.ceil((cores_for_deliveries + read_cores) / target.cores_per_node))
    readers = nodes if dense else min(target.room_size, nodes)
    shards = max(1, math.ceil(publishes * figures.redis_us / 1e6 / target.redis_cpu_target))
    egress = target.deliveries_per_s * figures.envelope_bytes / nodes / (1024 * 1024)
    return Plan(
        case="one dense room" if dense else f"rooms of {target.room_size}",
        publishes_per_s=publishes,
        nodes_for_cpu=math.ceil((cores_for_deliveries + read_cores) / target.cores_per_node),
        nodes_for_memory=memory_nodes,
        nodes=nodes,
        redis_shards=shards,
        egress_mib_per_s_per_node=egress,
        hot_room_limit_per_s=1e6 * target.redis_cpu_target / figures.redis_us,
    )


def report(figures: Figures, target: Target) -> str:
    lines = [
        "## Inputs",
        "",
        "| figure | value | from |",
        "|---|---|---|",
        f"| app CPU per delivery, one dense room | {figures.dense_us:.2f} µs"
        f" | {figures.sources['dense_us']} |",
        f"| app CPU per delivery, small rooms | {figures.rooms_us:.2f} µs"
        f" | {figures.sources['rooms_us']} |",
        f"| app CPU per publish read from Redis, per node | {figures.node_read_us:.1f} µs"
        f" | {figures.sources['node_read_us']} |",
        f"| Redis CPU per publish | {figures.redis_us:.1f} µs | {figures.sources['redis_us']} |",
        f"| memory per idle connection | {figures.idle_kib:.1f} KiB"
        f" | {figures.sources['idle_kib']} |",
        f"| bytes per envelope | {figures.envelope_bytes} | a 40-character chat message |",
        "",
        f"Target: {target.connections:,} connections, {target.deliveries_per_s:,.0f}"
        f" deliveries/s; nodes of {target.cores_per_node} cores and"
        f" {target.memory_per_node_gib:g} GiB used to {target.cpu_target:.0%} of their CPU;"
        f" Redis shards used to {target.redis_cpu_target:.0%} of their one thread.",
        "",
        "## Plan",
        "",
        "| case | publishes/s | nodes (CPU) | nodes (memory) | **nodes** | **Redis shards**"
        " | egress per node | most publishes/s in one room |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dense in (True, False):
        p = plan(figures, target, dense)
        lines.append(
            f"| {p.case} | {p.publishes_per_s:,.1f} | {p.nodes_for_cpu} | {p.nodes_for_memory}"
            f" | **{p.nodes}** | **{p.redis_shards}** | {p.egress_mib_per_s_per_node:.1f} MiB/s"
            f" | {p.hot_room_limit_per_s:,.0f} |"
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
