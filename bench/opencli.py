"""``python -m bench --open-loop``: the ladder of loads per server and scenario, then the report.

Order: whole repetitions one after the other (as the closed loop), and within one, scenario by
scenario, server by server, loads rising. Every run starts its own server. The time budget
stops new runs from starting; a skipped run is shown as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from .openloop import OpenLoopConfig, OpenLoopResult, combine_open, run_open_loop, verdict
from .openreport import plot, replace_section, section
from .procfs import machine_description
from .runner import ROOT, wait_for


def plan(args: argparse.Namespace) -> list[OpenLoopConfig]:
    """Every open-loop run of one repetition, in order."""
    common = {
        "seconds": args.load_seconds,
        "client_procs": args.client_procs,
        "run_timeout": args.run_timeout,
        "drain_timeout": args.drain_timeout,
    }
    runs: list[OpenLoopConfig] = []
    for scenario in args.open_scenarios:
        for server in args.servers:
            if scenario == "dense":
                runs += [
                    OpenLoopConfig(server, "dense", args.dense_clients, 1, load, **common)
                    for load in args.loads
                ]
            elif scenario == "rooms":
                runs += [
                    OpenLoopConfig(server, "rooms", args.rooms_clients, args.rooms, load, **common)
                    for load in args.rooms_loads
                ]
            else:
                clients = args.rooms_clients
                runs += [
                    OpenLoopConfig(server, "split", clients, clients // size, load, **common)
                    for size in args.split_sizes
                    for load in args.split_load
                ]
    return runs


def _label(index: int, total: int, config: OpenLoopConfig) -> str:
    return (
        f"[{index}/{total}] open loop {config.server} {config.scenario} N={config.clients}"
        f" in {config.rooms} room(s) at {config.load:,.0f} deliveries/s"
        f" ({config.rate:,.0f} msgs/s)"
    )


def run_open_loop_mode(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    started = time.monotonic()
    results_dir = ROOT / "bench" / "results"
    log_dir = results_dir / "logs"
    configs = plan(args)
    by_config: dict[OpenLoopConfig, list[OpenLoopResult]] = {c: [] for c in configs}
    runs = [config for _ in range(args.repeat) for config in configs]
    for index, config in enumerate(runs, 1):
        label = _label(index, len(runs), config)
        if time.monotonic() - started > args.time_budget:
            result = OpenLoopResult(
                config.server, config.scenario, config.clients, 0, config.messages
            )
            result.rooms, result.offered = config.rooms, config.load
            result.offered_msgs_per_s = config.rate
            result.error = "skipped: time budget spent"
        else:
            print(label, "...", file=sys.stderr, flush=True)
            result = run_open_loop(config, log_dir)
            wait_for(0.3)
        by_config[config].append(result)
        summary = result.error or (
            f"{verdict(result)}: {result.deliveries_per_s:,.0f} deliveries/s,"
            f" p99 {result.p99_ms:.1f} ms, {result.cpu_us_per_delivery:.1f} us CPU/delivery,"
            f" lost {result.lost}, sender lag p99 {result.sender_lag_p99_ms:.1f} ms, receiver"
            f" loop lag p99 {result.receiver_lag_p99_ms:.1f} ms"
        )
        print(f"{label}: {summary}", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    results = [combine_open(by_config[config]) for config in configs]
    raw = {
        "machine": machine_description(),
        "args": list(argv) if argv is not None else sys.argv[1:],
        "elapsed_s": elapsed,
        "results": [asdict(r) for r in results],
        "runs": [asdict(r) for group in by_config.values() for r in group],
    }
    json_path = args.out.with_suffix(".json") if args.smoke else results_dir / "open-loop.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(raw, indent=1))
    png = args.out.with_name(args.out.stem + "-open-loop.png")
    has_plot = plot(results, png)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    note = ""
    if args.smoke:
        note = (
            "**Smoke run**: a few clients at tiny loads, to check the machinery; no figure"
            " here means anything."
        )
    text = section(
        results,
        command=command.strip(),
        elapsed=elapsed,
        png_name=png.name if has_plot else None,
        note=note,
    )
    replace_section(args.out, text)
    print(f"wrote the open-loop section of {args.out} ({elapsed:.0f} s)", file=sys.stderr)
