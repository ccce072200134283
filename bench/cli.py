"""The command line: which servers, which scenarios, how many clients and messages."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .procfs import machine_description
from .report import write_report
from .runner import (
    MAX_CLIENTS,
    MAX_ROOMS,
    ROOT,
    RunConfig,
    RunResult,
    combine,
    run_one,
    wait_for,
)
from .servers import SERVERS

SCENARIOS = ("fanout", "rooms", "stall", "redis", "redis-rooms", "cluster", "workers")
DEFAULT_SERVERS = "chat,chat-asgi,naive,websockets,broadcaster,fastpath,socketio,node"
OPEN_SCENARIOS = ("dense", "rooms", "split")
DEFAULT_OPEN_SERVERS = "chat,fastpath,naive,websockets,node"
MAX_LOAD = 1_000_000
STALL_CLIENTS = 100
STALL_PAD = 2048
REDIS_CLIENTS = 500
WORKERS = (1, 2)
"""The workers scenario's ``--workers`` values, on one Redis and one port."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(not 1 <= v <= MAX_CLIENTS for v in values):
        raise argparse.ArgumentTypeError(f"each count must be 1..{MAX_CLIENTS}")
    return values


def _loads(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(not 1 <= v <= MAX_LOAD for v in values):
        raise argparse.ArgumentTypeError(f"each load must be 1..{MAX_LOAD} deliveries/s")
    return sorted(set(values))


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [name for name in names if name not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; not {unknown}")
        return names

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the broadcast servers side by side on 127.0.0.1 and write"
        " a Markdown report with a PNG plot.",
    )
    parser.add_argument(
        "--servers",
        type=_names(list(SERVERS)),
        default=None,
        help=f"comma-separated, from {', '.join(SERVERS)} (default {DEFAULT_SERVERS};"
        f" with --open-loop {DEFAULT_OPEN_SERVERS})",
    )
    parser.add_argument(
        "--clients",
        type=_int_list,
        default=[100, 500, 1000, 5000],
        help="subscriber counts for the fan-out scenario, comma-separated"
        " (default 100,500,1000,5000)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=5000,
        help="messages the sender sends per fan-out run, fewer if that would exceed"
        " --max-deliveries (default %(default)s, at most 100000)",
    )
    parser.add_argument(
        "--max-deliveries",
        type=int,
        default=500_000,
        help="bound on messages x subscribers per fan-out run (default %(default)s)",
    )
    parser.add_argument(
        "--scenario",
        type=_names(SCENARIOS),
        default=list(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default all)",
    )
    parser.add_argument(
        "--rooms",
        type=int,
        default=50,
        help="rooms of the rooms scenario: subscribers and messages are dealt round-robin"
        " over them (default %(default)s)",
    )
    parser.add_argument(
        "--rooms-clients",
        type=int,
        default=1000,
        help="subscribers of the rooms scenario (default %(default)s)",
    )
    parser.add_argument(
        "--stall-messages",
        type=int,
        default=2000,
        help="messages per run of the stall scenario (default %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of everything, interleaved; the report shows medians (default %(default)s)",
    )
    parser.add_argument(
        "--window", type=int, default=8, help="messages in flight (default %(default)s)"
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=0,
        help="subscriber processes per run (default: one per 250 subscribers, at most cores)",
    )
    parser.add_argument(
        "--run-timeout", type=float, default=120.0, help="hard limit per run, s (default 120)"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop starting new runs after this many seconds (default 1200; 3600 with --open-loop)",
    )
    group = parser.add_argument_group(
        "open loop", "fixed send rates over a ladder of loads (docs/benchmarks.md, its section)"
    )
    group.add_argument(
        "--open-loop",
        action="store_true",
        help="run the open-loop ladder instead of the closed-loop scenarios; rewrites only"
        " the open-loop section of the report",
    )
    group.add_argument(
        "--open-scenarios",
        type=_names(OPEN_SCENARIOS),
        default=list(OPEN_SCENARIOS),
        help=f"comma-separated, from {', '.join(OPEN_SCENARIOS)} (default all)",
    )
    group.add_argument(
        "--loads",
        type=_loads,
        default=[50_000, 100_000, 150_000, 200_000],
        help="offered loads of the dense scenario, deliveries/s (default 50000,100000,"
        "150000,200000)",
    )
    group.add_argument(
        "--rooms-loads",
        type=_loads,
        default=[10_000, 20_000, 40_000, 80_000, 120_000],
        help="offered loads of the rooms scenario (--rooms, --rooms-clients), deliveries/s"
        " (default 10000,20000,40000,80000,120000)",
    )
    group.add_argument(
        "--dense-clients",
        type=int,
        default=500,
        help="subscribers of the dense scenario, one room (default %(default)s)",
    )
    group.add_argument(
        "--load-seconds",
        type=float,
        default=5.0,
        help="seconds of sending at each load (default %(default)s)",
    )
    group.add_argument(
        "--split-sizes",
        type=_int_list,
        default=[5, 20, 100],
        help="room sizes of the cost split's runs, --rooms-clients subscribers each"
        " (default 5,20,100)",
    )
    group.add_argument(
        "--split-load",
        type=_loads,
        default=[20_000],
        help="the one offered load of the cost split's runs, deliveries/s (default 20000)",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="after the last send, wait at most this long for late frames (default 10)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown report (default docs/benchmarks.md)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run to check the harness works (chat, chat-asgi, naive and socketio,"
        " 5 clients, 20 messages, fan-out and 2 rooms; report in bench/results/smoke.md"
        " unless --out)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 100_000 or not 1 <= args.stall_messages <= 100_000:
        parser.error("--messages and --stall-messages must be 1..100000")
    if not 1 <= args.window <= 1000:
        parser.error("--window must be 1..1000")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be 1..10")
    if not 1 <= args.rooms_clients <= MAX_CLIENTS:
        parser.error(f"--rooms-clients must be 1..{MAX_CLIENTS}")
    if not 1 <= args.rooms <= min(MAX_ROOMS, args.rooms_clients):
        parser.error(f"--rooms must be 1..{MAX_ROOMS} and at most --rooms-clients")
    if not 0.1 <= args.load_seconds <= 60 or not 0.5 <= args.drain_timeout <= 60:
        parser.error("--load-seconds must be 0.1..60 and --drain-timeout 0.5..60")
    if not 1 <= args.dense_clients <= MAX_CLIENTS:
        parser.error(f"--dense-clients must be 1..{MAX_CLIENTS}")
    if args.time_budget is None:
        args.time_budget = 3600.0 if args.open_loop else 1200.0
    if args.open_loop:
        return _open_loop_args(parser, args)
    if args.smoke:
        args.servers = ["chat", "chat-asgi", "naive", "socketio"]
        args.clients, args.messages = [5], 20
        args.scenario, args.client_procs, args.run_timeout = ["fanout", "rooms"], 1, 30.0
        args.rooms, args.rooms_clients = 2, 5
        args.time_budget, args.repeat = 60.0, 1
        if args.out is None:
            args.out = ROOT / "bench" / "results" / "smoke.md"
    if args.servers is None:
        args.servers = DEFAULT_SERVERS.split(",")
    if args.out is None:
        args.out = ROOT / "docs" / "benchmarks.md"
    return args


def _open_loop_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.Namespace:
    """Defaults and bounds of the open-loop mode; ``--smoke`` makes it tiny (seconds)."""
    if any(size > args.rooms_clients for size in args.split_sizes):
        parser.error("--split-sizes must be at most --rooms-clients")
    if args.smoke:
        args.servers = args.servers or ["chat", "node"]
        args.dense_clients, args.loads = 6, [600]
        args.rooms, args.rooms_clients, args.rooms_loads = 2, 6, [600]
        args.split_sizes, args.split_load = [1, 2, 3], [600]
        args.load_seconds, args.drain_timeout, args.client_procs = 0.5, 3.0, 1
        args.run_timeout, args.time_budget, args.repeat = 30.0, 120.0, 1
        if args.out is None:
            args.out = ROOT / "bench" / "results" / "smoke-open.md"
    if args.servers is None:
        args.servers = DEFAULT_OPEN_SERVERS.split(",")
    if args.out is None:
        args.out = ROOT / "docs" / "benchmarks.md"
    return args


def plan(args: argparse.Namespace) -> list[RunConfig]:
    """Every run, in order: fan-out by N then server, many rooms, stall, Redis, Redis
    Cluster (two nodes of the servers that have a Redis backend), then workers (one node on
    one Redis with ``--workers 1`` and ``--workers 2``, at the Redis scenario's load)."""
    runs: list[RunConfig] = []
    common = {"window": args.window, "client_procs": args.client_procs}
    common_t = {"run_timeout": args.run_timeout}
    if "fanout" in args.scenario:
        for clients in args.clients:
            messages = min(args.messages, max(10, args.max_deliveries // clients))
            for server in args.servers:
                runs.append(RunConfig(server, "fanout", clients, messages, **common, **common_t))
    if "rooms" in args.scenario:
        per_message = -(-args.rooms_clients // args.rooms)  # the biggest room's subscribers
        messages = min(args.messages, max(10, args.max_deliveries // per_message))
        for server in args.servers:
            runs.append(
                RunConfig(
                    server,
                    "rooms",
                    args.rooms_clients,
                    messages,
                    rooms=args.rooms,
                    **common,
                    **common_t,
                )
            )
    if "stall" in args.scenario:
        for server in args.servers:
            for stalled in (0, 1):
                # The stall scenario pads messages so the stalled client's buffers fill.
                runs.append(
                    RunConfig(
                        server,
                        "stall",
                        STALL_CLIENTS,
                        args.stall_messages,
                        pad=STALL_PAD,
                        stalled=stalled,
                        **common,
                        **common_t,
                    )
                )
    if "redis" in args.scenario:
        messages = min(args.messages, max(10, args.max_deliveries // REDIS_CLIENTS))
        for server in args.servers:
            if not SERVERS[server].redis:
                continue
            for nodes in (1, 2):
                runs.append(
                    RunConfig(
                        server,
                        "redis",
                        REDIS_CLIENTS,
                        messages,
                        nodes=nodes,
                        backend="redis",
                        **common,
                        **common_t,
                    )
                )
    if "redis-rooms" in args.scenario:
        # The rooms scenario on one Redis node: with the redis rows (one room of 500), it
        # separates the cost per publish read from Redis from the cost per delivery
        # (bench.capacity fits both).
        per_message = -(-args.rooms_clients // args.rooms)
        messages = min(args.messages, max(10, args.max_deliveries // per_message))
        runs += [
            RunConfig(
                server,
                "redis-rooms",
                args.rooms_clients,
                messages,
                rooms=args.rooms,
                backend="redis",
                **common,
                **common_t,
            )
            for server in args.servers
            if SERVERS[server].redis
        ]
    if "cluster" in args.scenario:
        messages = min(args.messages, max(10, args.max_deliveries // REDIS_CLIENTS))
        runs += [
            RunConfig(
                server,
                "cluster",
                REDIS_CLIENTS,
                messages,
                nodes=2,
                backend="redis-cluster",
                **common,
                **common_t,
            )
            for server in args.servers
            if SERVERS[server].redis
        ]
    if "workers" in args.scenario:
        messages = min(args.messages, max(10, args.max_deliveries // REDIS_CLIENTS))
        runs += [
            RunConfig(
                server,
                "workers",
                REDIS_CLIENTS,
                messages,
                backend="redis",
                workers=workers,
                **common,
                **common_t,
            )
            for server in args.servers
            if SERVERS[server].redis and SERVERS[server].module == "examples.chat_app"
            for workers in WORKERS
        ]
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.open_loop:
        from .opencli import run_open_loop_mode

        run_open_loop_mode(args, argv)
        return
    started = time.monotonic()
    results_dir = ROOT / "bench" / "results"
    log_dir = results_dir / "logs"
    configs = plan(args)
    by_config: dict[RunConfig, list[RunResult]] = {config: [] for config in configs}
    # Whole repetitions one after the other: a slow spell of the machine hits one of each
    # run's repetitions, not all of one server's; the time budget drops whole repetitions last.
    runs = [config for _ in range(args.repeat) for config in configs]
    for index, config in enumerate(runs, 1):
        label = f"[{index}/{len(runs)}] {config.server} {config.scenario} N={config.clients}"
        if config.stalled:
            label += f" +{config.stalled} stalled"
        if config.backend == "redis":
            label += f" on {config.nodes} node(s)"
        if config.workers:
            label += f" with --workers {config.workers}"
        if config.backend == "redis-cluster":
            label += f" on {config.nodes} node(s) of a Redis Cluster"
        if config.rooms > 1:
            label += f" in {config.rooms} rooms"
        if time.monotonic() - started > args.time_budget:
            result = RunResult(
                config.server, config.scenario, config.clients, config.stalled, config.messages
            )
            result.rooms = config.rooms
            result.error = "skipped: time budget spent"
        else:
            print(label, "...", file=sys.stderr, flush=True)
            result = run_one(config, log_dir)
            if SERVERS[config.server].available:
                wait_for(0.3)
        by_config[config].append(result)
        summary = result.error or (
            f"{result.deliveries_per_s:,.0f} deliveries/s, p99 {result.p99_ms:.1f} ms,"
            f" {result.cpu_us_per_delivery:.1f} us CPU/delivery, lost {result.lost}"
            + (f", wrong room {result.wrong_room}" if config.rooms > 1 else "")
        )
        print(f"{label}: {summary}", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    machine = machine_description()
    results_dir.mkdir(parents=True, exist_ok=True)
    raw = {"machine": machine, "args": sys.argv[1:], "elapsed_s": elapsed}
    results = [combine(by_config[config]) for config in configs]
    raw["results"] = [r.to_dict() for r in results]
    raw["runs"] = [r.to_dict() for group in by_config.values() for r in group]
    json_path = args.out.with_suffix(".json") if args.smoke else results_dir / "latest.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(raw, indent=1))
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(args.out, results, machine, command.strip(), elapsed, args)
    print(f"wrote {args.out} ({elapsed:.0f} s)", file=sys.stderr)
