"""One measured run: start a server, connect subscribers, send, tally, stop everything."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .clients import (
    SendResult,
    Shared,
    WorkerReport,
    open_stalled_client,
    send_messages,
    subscriber_process,
    warm_up,
)
from .cluster import local_cluster, server_pids
from .cluster import unavailable_reason as cluster_unavailable_reason
from .procfs import (
    STARTUP_DEADLINE,
    ServerProcess,
    children,
    cpu_seconds,
    free_port,
    peak_rss_kib,
    rss_kib,
    wait_quiet,
)
from .protocols import PROTOCOLS
from .servers import SERVERS, spec_command

ROOT = Path(__file__).resolve().parents[1]
MAX_CLIENTS = 10_000
MAX_ROOMS = 1000
ROOM = "bench"
READY_LINE = b"Application startup complete"
"""What uvicorn logs (at ``info``) once it serves: each ``--workers`` worker logs it once."""


@dataclass(frozen=True)
class RunConfig:
    server: str
    scenario: str
    clients: int
    messages: int
    window: int = 8
    pad: int = 64
    stalled: int = 0
    client_procs: int = 0
    """0: one process per 250 subscribers, at most the number of cores."""
    run_timeout: float = 120.0
    stall_timeout: float = 3.0
    nodes: int = 1
    """Server processes; more than one needs ``backend="redis"`` or ``"redis-cluster"``."""
    backend: str = "memory"
    """``memory``, ``redis`` (one fresh redis-server) or ``redis-cluster`` (a fresh local
    cluster of 3 primaries with a replica each, ``bench/cluster.py``)."""
    connect_concurrency: int = 50
    """Handshakes each subscriber process runs at once."""
    rooms: int = 1
    """Subscribers are dealt round-robin over this many rooms, and so are the messages."""
    workers: int = 0
    """The chat app's ``--workers N`` (0: not passed): N processes on each node's port, each
    binding it with SO_REUSEPORT; with more than 1 the first process only supervises them."""


@dataclass
class RunResult:
    server: str
    scenario: str
    clients: int
    stalled: int
    messages: int
    sent: int = 0
    froze: bool = False
    expected: int = 0
    deliveries: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    closed_early: int = 0
    failed_connects: int = 0
    duration_s: float = 0.0
    deliveries_per_s: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    cpu_s: float = 0.0
    cpu_us_per_delivery: float = math.nan
    peak_rss_mib: float = 0.0
    idle_kib_per_connection: float = math.nan
    error: str = ""
    runs: int = 1
    """Repetitions combined into this result (see `combine`)."""
    cpu_us_min: float = math.nan
    cpu_us_max: float = math.nan
    failed_runs: int = 0
    """Repetitions that failed (an error) and are not in the figures."""
    nodes: int = 1
    backend: str = "memory"
    redis_cpu_s: float = 0.0
    """CPU seconds of redis-server (all of a cluster's) over the measured window (not in
    ``cpu_s``)."""
    rooms: int = 1
    wrong_room: int = 0
    """Frames of another room's messages that reached a subscriber (must be 0)."""
    workers: int = 0
    """``--workers`` of each node (0: not passed); CPU and memory are then the whole
    process tree's: the supervisor and its workers."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MEDIAN_FIELDS = (
    "duration_s",
    "deliveries_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_s",
    "cpu_us_per_delivery",
    "peak_rss_mib",
    "idle_kib_per_connection",
    "redis_cpu_s",
)
_WORST_FIELDS = (
    "lost",
    "duplicates",
    "out_of_order",
    "wrong_room",
    "closed_early",
    "failed_connects",
    "expected",
    "deliveries",
)


def combine(results: list[RunResult]) -> RunResult:
    """Repetitions of one run as one row: medians of the measures, the worst of the counts.

    Runs that failed are left out; if all failed, the first one is returned as it is.
    """
    good = [r for r in results if not r.error and r.sent]
    if not good:
        return results[0]
    combined = type(good[0])(**asdict(good[0]))
    for name in _MEDIAN_FIELDS:
        values = [getattr(r, name) for r in good if not math.isnan(getattr(r, name))]
        setattr(combined, name, statistics.median(values) if values else math.nan)
    for name in _WORST_FIELDS:
        setattr(combined, name, max(getattr(r, name) for r in good))
    combined.sent = min(r.sent for r in good)
    combined.froze = any(r.froze for r in good)
    combined.runs = len(good)
    cpus = [r.cpu_us_per_delivery for r in good if not math.isnan(r.cpu_us_per_delivery)]
    if cpus:
        combined.cpu_us_min, combined.cpu_us_max = min(cpus), max(cpus)
    failed = len(results) - len(good)
    if failed:
        combined.failed_runs = failed
    return combined


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return float(sorted_values[index])


def _client_procs(config: RunConfig) -> int:
    if config.client_procs > 0:
        return min(config.client_procs, config.clients)
    cores = max(1, multiprocessing.cpu_count())
    return max(1, min(cores, math.ceil(config.clients / 250)))


def _redis_process(log_dir: Path, label: str) -> ServerProcess:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--maxmemory-policy", "noeviction"]
    return ServerProcess("redis", command, port, log_dir / f"{label}-redis.log")


def _wait_for_workers(server: ServerProcess, workers: int, log_offset: int) -> list[int]:
    """Wait (bounded) until every worker of ``--workers`` serves: as many children of the
    supervisor as workers (none with ``--workers 1``: the process serves itself) and the
    ready line logged once per worker since the start. Returns the tree's pids, the
    supervisor first."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    expected_children = workers if workers > 1 else 0
    while True:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited at startup; see {server.log_path}")
        with server.log_path.open("rb") as log:
            log.seek(log_offset)
            ready = log.read().count(READY_LINE)
        kids = children(server.pid)
        if len(kids) == expected_children and ready >= workers:
            return [server.pid, *kids]
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name}: {ready} of {workers} workers serving ({len(kids)} children)"
                " within the deadline"
            )
        time.sleep(0.05)


def _tree_cpu(trees: list[list[int]]) -> float:
    return sum(cpu_seconds(pid) for tree in trees for pid in tree)


def _kill_left_over(pids: list[int]) -> None:
    """SIGKILL workers that outlived their supervisor's stop (it waits for them itself)."""
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                os.kill(pid, signal.SIGKILL)


def run_one(config: RunConfig, log_dir: Path) -> RunResult:
    """Run one server through one scenario; never raises for the server's failures."""
    spec = SERVERS[config.server]
    result = RunResult(
        config.server, config.scenario, config.clients, config.stalled, config.messages
    )
    result.nodes, result.backend, result.rooms = config.nodes, config.backend, config.rooms
    result.workers = config.workers
    reason = spec.unavailable_reason()
    if reason is None and config.backend == "redis-cluster":
        reason = cluster_unavailable_reason()
    if reason is not None:
        result.error = f"skipped: {reason}"
        return result
    if not 1 <= config.clients <= MAX_CLIENTS or not 1 <= config.nodes <= 4:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS}, nodes 1..4")
    if not 0 <= config.workers <= 4 or (config.workers > 1 and config.backend == "memory"):
        raise ValueError("workers must be 0..4, and more than 1 needs a Redis backend")
    if not 1 <= config.rooms <= min(MAX_ROOMS, config.clients):
        raise ValueError(f"rooms must be 1..{MAX_ROOMS} and at most the clients")
    protocol = PROTOCOLS[spec.protocol]
    rooms = [ROOM] if config.rooms == 1 else [f"{ROOM}-{r}" for r in range(config.rooms)]
    label = f"{config.server}-{config.scenario}-{config.clients}-{config.nodes}"
    if config.workers:
        label += f"-w{config.workers}"
    ctx = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    pipes: list[Any] = []
    stalled: list[socket.socket] = []
    redis: ServerProcess | None = None
    redis_pids: list[int] = []
    servers: list[ServerProcess] = []
    trees: list[list[int]] = []
    """Each node's pids: the server alone, or with --workers its supervisor and workers."""
    cleanup = contextlib.ExitStack()
    try:
        extra: list[str] = []
        if config.backend in ("redis", "redis-cluster") and not spec.redis:
            raise ValueError(f"{spec.name} has no Redis backend")
        if config.backend == "redis":
            redis = _redis_process(log_dir, label)
            redis.start(ROOT)
            redis_pids = [redis.pid]
            extra = ["--backend", f"redis://127.0.0.1:{redis.port}/0"]
        elif config.backend == "redis-cluster":
            cluster = cleanup.enter_context(local_cluster())
            redis_pids = server_pids(cluster)
            extra = ["--backend", cluster.url]
        for node in range(config.nodes):
            port = free_port()
            command = [*spec_command(spec, port), *extra]
            if config.workers:
                # At info level uvicorn logs its ready line, once per worker (the chat app
                # logs nothing per message at info: setup lines only, before the window).
                command += ["--workers", str(config.workers), "--log-level", "info"]
            log = log_dir / f"{label}-node{node}.log"
            servers.append(ServerProcess(config.server, command, port, log))
        for server in servers:
            offset = server.log_path.stat().st_size if server.log_path.exists() else 0
            server.start(ROOT)
            if config.workers:
                trees.append(_wait_for_workers(server, config.workers, offset))
            else:
                trees.append([server.pid])
        bases = [f"ws://127.0.0.1:{server.port}" for server in servers]
        for base in bases:
            asyncio.run(warm_up(base + protocol.path("warmup", ROOM), protocol))
        for pid in (pid for tree in trees for pid in tree):
            wait_quiet(pid, limit=5)
        rss_before = sum(rss_kib(pid) for tree in trees for pid in tree)
        for _ in range(config.stalled):
            stalled.append(
                open_stalled_client(
                    "127.0.0.1", servers[0].port, protocol.path("stalled", ROOM), protocol=protocol
                )
            )
        procs = _client_procs(config)
        # Subscribers share one client id: presence is per client id, so the chat app sends
        # one join per room, not N joins to N members (an O(N^2) storm at setup that is not
        # measured). Subscribers are dealt round-robin over the rooms and, with several
        # nodes, over the nodes; the sender is on the first node.
        subscriptions = [
            (bases[i % len(bases)] + protocol.path("sub", rooms[i % len(rooms)]), i % len(rooms))
            for i in range(config.clients)
        ]
        progress, live = ctx.RawArray("q", procs), ctx.RawArray("q", procs)
        for i in range(procs):
            parent_end, child_end = ctx.Pipe()
            worker = ctx.Process(
                target=subscriber_process,
                args=(
                    child_end,
                    subscriptions[i::procs],
                    len(rooms),
                    config.messages,
                    config.run_timeout,
                    Shared(progress, live, i, config.connect_concurrency),
                    protocol.name,
                ),
                daemon=True,
            )
            worker.start()
            child_end.close()
            workers.append(worker)
            pipes.append(parent_end)
        result.failed_connects += wait_connected(pipes, config.run_timeout)
        connected_total = config.clients - result.failed_connects
        for pid in (pid for tree in trees for pid in tree):
            wait_quiet(pid, limit=30)
        rss_idle = sum(rss_kib(pid) for tree in trees for pid in tree)
        if connected_total:
            result.idle_kib_per_connection = (rss_idle - rss_before) / (
                connected_total + config.stalled
            )
        cpu_before = _tree_cpu(trees)
        redis_before = sum(cpu_seconds(pid) for pid in redis_pids)
        # A subscriber receives the messages of its room only, 1/rooms of them: scaled by the
        # rooms, the average is in messages sent (exact when each room has as many
        # subscribers; with the remainder in the first rooms it is never short).
        sent: SendResult = asyncio.run(
            asyncio.wait_for(
                send_messages(
                    [bases[0] + protocol.path("sender", room) for room in rooms],
                    config.messages,
                    received=lambda: sum(progress) * len(rooms) / max(1, sum(live)),
                    window=config.window,
                    pad=config.pad,
                    stall_timeout=config.stall_timeout,
                    protocol=protocol,
                ),
                config.run_timeout,
            )
        )
        result.sent, result.froze = sent.sent, sent.froze
        for pipe in pipes:
            pipe.send(("finish", sent.sent, sent.last_send_ns))
        reports: list[WorkerReport] = []
        for pipe in pipes:
            if not pipe.poll(config.run_timeout):
                raise RuntimeError("subscribers did not report within the run timeout")
            _, report = pipe.recv()
            reports.append(report)
        if all(server.alive() for server in servers):
            try:
                result.cpu_s = _tree_cpu(trees) - cpu_before
                peak = sum(peak_rss_kib(pid) for tree in trees for pid in tree)
                result.peak_rss_mib = peak / 1024
            except OSError:  # a worker gone
                result.error = "a worker died"
        else:
            result.error = "server died"
        with contextlib.suppress(OSError):  # a redis-server gone: no figure, not an error
            result.redis_cpu_s = sum(cpu_seconds(pid) for pid in redis_pids) - redis_before
        _tally(result, reports, sent)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for sock in stalled:
            sock.close()
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        for pipe in pipes:
            pipe.close()
        for server in servers:
            server.stop()
        _kill_left_over([pid for tree in trees for pid in tree[1:]])
        if redis is not None:
            redis.stop()
        cleanup.close()
    return result


def wait_connected(pipes: Sequence[Any], timeout: float) -> int:
    """Wait until every subscriber process says it connected; return how many connects
    failed. Raises if one does not answer within ``timeout`` seconds."""
    failed = 0
    for pipe in pipes:
        if not pipe.poll(timeout):
            raise RuntimeError("subscribers did not connect within the run timeout")
        _, _connected, count = pipe.recv()
        failed += count
    return failed


def _tally(result: RunResult, reports: list[WorkerReport], sent: SendResult) -> None:
    tally(result, reports, sent.first_send_ns)


def tally(result: Any, reports: Sequence[Any], first_send_ns: int) -> None:
    """Fill ``result``'s counts, rate, latencies and CPU per delivery from the subscriber
    processes' ``reports`` (closed-loop and open-loop runs report the same fields)."""
    result.expected = sum(r.expected for r in reports)
    result.deliveries = sum(r.unique for r in reports)
    result.lost = sum(r.lost for r in reports)
    result.wrong_room = sum(r.wrong_room for r in reports)
    result.duplicates = sum(r.duplicates for r in reports)
    result.out_of_order = sum(r.out_of_order for r in reports)
    result.closed_early = sum(r.closed_early for r in reports)
    last = max((r.last_receive_ns for r in reports), default=0)
    if last > first_send_ns:
        result.duration_s = (last - first_send_ns) / 1e9
        result.deliveries_per_s = result.deliveries / result.duration_s
    latencies = sorted(v for r in reports for v in r.latencies_us)
    result.p50_ms = _percentile(latencies, 0.50) / 1000
    result.p99_ms = _percentile(latencies, 0.99) / 1000
    if result.deliveries:
        result.cpu_us_per_delivery = result.cpu_s / result.deliveries * 1e6
        result.cpu_us_min = result.cpu_us_max = result.cpu_us_per_delivery


def wait_for(seconds: float) -> None:
    """Sleep between runs so the previous server's sockets are gone (bounded)."""
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(seconds)
