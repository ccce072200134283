"""Open-loop runs: a fixed send rate, whatever the server does, and whether the load was held.

The closed loop (``bench/clients.py``) runs each server at its own speed; it cannot say what a
user sees at a given load. Here the sender sends on a clock: message i is due at
``start + i / rate``, ``rate`` = offered deliveries/s divided by the subscribers per room. It
never waits for anything the server sends back (its own copies are read and dropped as they
come, so they cannot pace it); at each wake-up it writes every message that is due, stamped
with the time of that write, in one write per room (batching). A load is **held** when
nothing was lost, at least 90% of the offered deliveries/s were delivered, and p99 latency
(receive - send stamp) is at most 100 ms.

The load generator is measured too, because on a 2-core machine it shares the CPUs with the
server: the sender's lag behind its schedule, and each subscriber process's event-loop lag
(how late a 5 ms timer fires: the time a frame that arrived waited before it was stamped) and
CPU. When either lags past `GENERATOR_LAG_MS` the run is marked **generator fell
behind**: its latency and rate say nothing sure about the server.

The subscribers and the sender speak raw WebSocket through `bench.rawws` (a few µs per
frame, about a third of the ``websockets`` client's), in several subscriber processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import resource
import statistics
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from .clients import Tally, sent_to_room, warm_up
from .procfs import ServerProcess, cpu_seconds, free_port, wait_quiet
from .protocols import PROTOCOLS, Plain
from .rawws import RawClient, client_frame, open_raw
from .runner import ROOM, ROOT, RunResult, _client_procs, combine, tally, wait_connected
from .servers import SERVERS, spec_command

HELD_DELIVERED_FRACTION = 0.9
HELD_P99_MS = 100.0
GENERATOR_LAG_MS = 20.0
"""p99 of the sender's lag behind its schedule, or of a subscriber process's loop lag, above
which the generator (not the server) is the bottleneck."""
LAG_PROBE_S = 0.005
MIN_TICK_S = 0.001
"""The sender sleeps at least this long between writes: messages due meanwhile go together."""
QUIET_AFTER_FINISH = 1.5
MAX_MESSAGES = 100_000
CONNECT_CONCURRENCY = 50


@dataclass(frozen=True)
class OpenLoopConfig:
    """One open-loop run: a server, a room layout and an offered load, for a bounded time."""

    server: str
    scenario: str
    """``dense`` (one room), ``rooms`` (many rooms) or ``split`` (a room size of the fit)."""
    clients: int
    rooms: int
    load: float
    """Offered deliveries per second (messages/s x subscribers per room)."""
    seconds: float = 5.0
    pad: int = 64
    client_procs: int = 0
    run_timeout: float = 120.0
    drain_timeout: float = 10.0
    """After the last send, wait at most this long for frames still on their way."""
    connect_concurrency: int = CONNECT_CONCURRENCY

    @property
    def fanout(self) -> float:
        """Subscribers per room, on average: deliveries per message."""
        return self.clients / self.rooms

    @property
    def rate(self) -> float:
        """Messages per second the sender offers."""
        return self.load / self.fanout

    @property
    def messages(self) -> int:
        return max(1, min(MAX_MESSAGES, round(self.rate * self.seconds)))


@dataclass
class OpenLoopResult(RunResult):
    """A `RunResult` with the open loop's offered load, verdict and generator health."""

    offered: float = 0.0
    """Offered deliveries per second."""
    offered_msgs_per_s: float = 0.0
    echoes: int = 0
    """The sender's own copies that came back (frames the server wrote to the sender)."""
    sender_lag_p99_ms: float = math.nan
    sender_lag_max_ms: float = math.nan
    receiver_lag_p99_ms: float = math.nan
    """The worst subscriber process's event-loop lag, p99."""
    receiver_cpu_busy: float = math.nan
    """The busiest subscriber process's CPU seconds per second of the run."""
    generator_behind: bool = False
    held: bool = False
    drained: bool = True
    """Every subscriber had all it expected before the drain timeout (or a quiet spell)."""


OPEN_MEDIANS = (
    "sender_lag_p99_ms",
    "sender_lag_max_ms",
    "receiver_lag_p99_ms",
    "receiver_cpu_busy",
    "echoes",
)


def combine_open(results: list[OpenLoopResult]) -> OpenLoopResult:
    """Repetitions as one row (medians, worst counts; see `bench.runner.combine`),
    the generator marked behind if it was in any repetition, and the verdict of the row."""
    combined = combine(list(results))
    assert isinstance(combined, OpenLoopResult)
    good = [r for r in results if not r.error and r.sent]
    if good:
        for name in OPEN_MEDIANS:
            values = [float(getattr(r, name)) for r in good]
            values = [v for v in values if not math.isnan(v)]
            setattr(combined, name, statistics.median(values) if values else math.nan)
        combined.generator_behind = any(r.generator_behind for r in good)
        combined.drained = all(r.drained for r in good)
    combined.held = is_held(combined)
    return combined


def is_held(result: OpenLoopResult) -> bool:
    """Nothing lost, ≥ 90% of the offered rate delivered, p99 ≤ 100 ms (and a clean run)."""
    if result.error or not result.sent or result.failed_connects or result.closed_early:
        return False
    return (
        result.lost == 0
        and result.deliveries_per_s >= HELD_DELIVERED_FRACTION * result.offered
        and result.p99_ms <= HELD_P99_MS
    )


def verdict(result: OpenLoopResult) -> str:
    """``held``, ``not held`` or ``generator fell behind`` (then nothing is said of the server)."""
    if result.error:
        return result.error
    if result.generator_behind:
        return "generator fell behind"
    return "held" if result.held else "not held"


@dataclass
class OpenLoopReport:
    """One subscriber process's tally of an open-loop run, and how the process kept up."""

    connections: int
    failed_connects: int
    expected: int
    unique: int
    duplicates: int
    out_of_order: int
    lost: int
    wrong_room: int
    closed_early: int
    last_receive_ns: int
    drained: bool
    cpu_s: float
    wall_s: float
    lag_p99_ms: float
    latencies_us: array[int] = field(default_factory=lambda: array("q"))


def _receiver(tally: Tally, latencies: array[int], last: list[int], prefix: bytes) -> Any:
    """The per-frame callback of one subscriber connection (see ``bench.clients._receive``)."""
    seen = tally.seen
    room_index = tally.room
    size = len(seen)

    def on_text(payload: bytes, now: int) -> None:
        if prefix and not payload.startswith(prefix):
            return
        start = payload.find(b"~")
        if start < 0:
            return
        parts = payload[start + 1 :].split(b"~", 3)
        if len(parts) < 4:
            return
        try:
            counter, sent_ns, room = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            return
        if room != room_index:
            tally.wrong_room += 1
            return
        if not 0 <= counter < size:
            return
        tally.received += 1
        last[0] = now
        if seen[counter]:
            tally.duplicates += 1
            return
        seen[counter] = 1
        if counter < tally.highest:
            tally.out_of_order += 1
        else:
            tally.highest = counter
        latencies.append((now - sent_ns) // 1000)

    return on_text


async def _lag_probe(lags: list[float]) -> None:
    """How late a short timer fires, again and again: the loop's own backlog (ms)."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append((time.monotonic() - before - LAG_PROBE_S) * 1000)


async def _subscriber_main(
    pipe: Pipe,
    port: int,
    subscriptions: list[tuple[str, int]],
    rooms: int,
    messages: int,
    config: dict[str, float],
    protocol_name: str,
) -> None:
    loop = asyncio.get_running_loop()
    protocol = PROTOCOLS[protocol_name]
    prefix = protocol.message_prefix.encode()
    per_room = -(-messages // rooms)
    latencies: array[int] = array("q")
    last = [0]
    semaphore = asyncio.Semaphore(int(config["connect_concurrency"]))

    async def connect(path: str, room: int) -> tuple[RawClient, Tally] | None:
        tally = Tally(bytearray(per_room), room)
        async with semaphore:
            try:
                client = await open_raw(
                    "127.0.0.1", port, path, protocol, _receiver(tally, latencies, last, prefix)
                )
            except (OSError, asyncio.TimeoutError):
                return None
        client.closed.add_done_callback(lambda _: setattr(tally, "closed", True))
        return client, tally

    opened = await asyncio.gather(*(connect(path, room) for path, room in subscriptions))
    pairs = [pair for pair in opened if pair is not None]
    tallies = [tally for _, tally in pairs]
    pipe.send(("ready", len(pairs), len(subscriptions) - len(pairs)))
    deadline = config["run_timeout"]
    lags: list[float] = []
    probe: asyncio.Task[None] | None = None
    sent = messages
    drained = False
    cpu_start = wall_start = 0.0
    try:
        await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), deadline)  # "start"
        wall_start, cpu_start = time.monotonic(), _process_cpu()
        probe = asyncio.create_task(_lag_probe(lags))
        command = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), deadline)
        sent, last_send_ns = int(command[1]), int(command[2])
        end = time.monotonic() + config["drain_timeout"]
        while time.monotonic() < end:
            if all(t.unique() >= sent_to_room(sent, rooms, t.room) or t.closed for t in tallies):
                drained = True
                break
            if time.time_ns() - max(last[0], last_send_ns) > QUIET_AFTER_FINISH * 1e9:
                break
            await asyncio.sleep(0.02)
    except (asyncio.TimeoutError, EOFError):
        pass
    finally:
        if probe is not None:
            probe.cancel()
    cpu_s, wall_s = _process_cpu() - cpu_start, time.monotonic() - wall_start
    expected = [sent_to_room(sent, rooms, t.room) for t in tallies]
    lost = [n - sum(t.seen[:n]) for n, t in zip(expected, tallies, strict=True)]
    report = OpenLoopReport(
        connections=len(pairs),
        failed_connects=len(subscriptions) - len(pairs),
        expected=sum(expected),
        unique=sum(t.unique() for t in tallies),
        duplicates=sum(t.duplicates for t in tallies),
        out_of_order=sum(t.out_of_order for t in tallies),
        lost=sum(lost),
        wrong_room=sum(t.wrong_room for t in tallies),
        closed_early=sum(1 for t in tallies if t.closed),
        last_receive_ns=last[0],
        drained=drained,
        cpu_s=cpu_s,
        wall_s=wall_s,
        lag_p99_ms=_percentile_f(lags, 0.99),
        latencies_us=latencies,
    )
    pipe.send(("report", report))
    for client, _ in pairs:
        client.close()
    await asyncio.sleep(0.05)


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile_f(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def subscriber_process(
    pipe: Pipe,
    port: int,
    subscriptions: list[tuple[str, int]],
    rooms: int,
    messages: int,
    config: dict[str, float],
    protocol_name: str,
) -> None:
    """Entry point of one open-loop subscriber process: connect each ``(path, room index)``,
    report ready, tally from "start" to the drain after "finish", report, exit."""
    main = _subscriber_main(pipe, port, subscriptions, rooms, messages, config, protocol_name)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


@dataclass
class PacedSend:
    """What the paced sender did."""

    sent: int
    first_send_ns: int
    last_send_ns: int
    lag_p99_ms: float
    lag_max_ms: float
    echoes: int


async def paced_send(
    senders: list[RawClient], protocol: Plain, messages: int, rate: float, pad: int
) -> PacedSend:
    """Send ``messages`` messages at ``rate`` per second, round-robin over the rooms' sender
    connections, on a clock; every message due at a wake-up goes out in one write per room.

    Lag = how late the first message of each wake-up's batch went out against its schedule.
    """
    padding = "x" * pad
    rooms = len(senders)
    lags: list[float] = []
    sent = 0
    start = time.monotonic()
    first = time.time_ns()
    while sent < messages:
        now = time.monotonic()
        due = min(messages, math.floor((now - start) * rate) + 1)
        if due > sent:
            lags.append((now - (start + sent / rate)) * 1000)
            stamp = time.time_ns()
            batches: list[list[bytes]] = [[] for _ in range(rooms)]
            for i in range(sent, due):
                room = i % rooms
                text = f"~{i // rooms}~{stamp}~{room}~{padding}"
                batches[room].append(client_frame(protocol.encode(text).encode()))
            for client, batch in zip(senders, batches, strict=True):
                if batch:
                    client.write(b"".join(batch))
            sent = due
        if sent < messages:
            wake = start + sent / rate
            await asyncio.sleep(max(MIN_TICK_S, wake - time.monotonic()))
    last = time.time_ns()
    return PacedSend(sent, first, last, _percentile_f(lags, 0.99), max(lags, default=math.nan), 0)


def run_open_loop(config: OpenLoopConfig, log_dir: Path) -> OpenLoopResult:
    """One open-loop run of one server at one load; never raises for the server's failures."""
    spec = SERVERS[config.server]
    result = OpenLoopResult(
        config.server, config.scenario, config.clients, 0, config.messages, rooms=config.rooms
    )
    result.offered, result.offered_msgs_per_s = config.load, config.rate
    reason = spec.unavailable_reason()
    if reason is not None:
        result.error = f"skipped: {reason}"
        return result
    if not 1 <= config.rooms <= config.clients:
        raise ValueError("rooms must be 1..clients")
    protocol = PROTOCOLS[spec.protocol]
    rooms = [ROOM] if config.rooms == 1 else [f"{ROOM}-{r}" for r in range(config.rooms)]
    label = f"{config.server}-open-{config.scenario}-{config.rooms}-{config.load:.0f}"
    ctx = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    pipes: list[Any] = []
    port = free_port()
    server = ServerProcess(config.server, spec_command(spec, port), port, log_dir / f"{label}.log")
    try:
        server.start(ROOT)
        asyncio.run(warm_up(f"ws://127.0.0.1:{port}" + protocol.path("warmup", ROOM), protocol))
        wait_quiet(server.pid, limit=5)
        procs = _client_procs(_Procs(config.clients, config.client_procs))
        subscriptions = [
            (protocol.path("sub", rooms[i % len(rooms)]), i % len(rooms))
            for i in range(config.clients)
        ]
        settings = {
            "run_timeout": config.run_timeout,
            "drain_timeout": config.drain_timeout,
            "connect_concurrency": config.connect_concurrency,
        }
        for i in range(procs):
            parent_end, child_end = ctx.Pipe()
            worker = ctx.Process(
                target=subscriber_process,
                args=(
                    child_end,
                    port,
                    subscriptions[i::procs],
                    len(rooms),
                    config.messages,
                    settings,
                    protocol.name,
                ),
                daemon=True,
            )
            worker.start()
            child_end.close()
            workers.append(worker)
            pipes.append(parent_end)
        result.failed_connects += wait_connected(pipes, config.run_timeout)
        wait_quiet(server.pid, limit=30)
        sent, reports, cpu_s = asyncio.run(
            asyncio.wait_for(
                _drive(config, protocol, port, rooms, pipes, server.pid),
                config.run_timeout + config.drain_timeout,
            )
        )
        if not server.alive():
            result.error = "server died"
        result.cpu_s = cpu_s
        _tally(result, reports, sent)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        for pipe in pipes:
            pipe.close()
        server.stop()
    result.held = is_held(result)
    return result


@dataclass(frozen=True)
class _Procs:
    """The two fields of a run config that `bench.runner._client_procs` reads."""

    clients: int
    client_procs: int


async def _drive(
    config: OpenLoopConfig,
    protocol: Plain,
    port: int,
    rooms: list[str],
    pipes: list[Any],
    server_pid: int,
) -> tuple[PacedSend, list[OpenLoopReport], float]:
    """Connect the senders, start the subscribers' clocks, send on the schedule, collect the
    reports while the senders stay connected (so nothing of theirs is cut short)."""
    loop = asyncio.get_running_loop()
    echoes = [0]
    prefix = protocol.message_prefix.encode()

    def count_echo(payload: bytes, _now: int) -> None:
        if payload.startswith(prefix) and b"~" in payload:
            echoes[0] += 1

    senders = [
        await open_raw("127.0.0.1", port, protocol.path("sender", room), protocol, count_echo)
        for room in rooms
    ]
    try:
        await asyncio.sleep(0.2)  # the senders' joins reach the rooms before the first send
        cpu_before = cpu_seconds(server_pid)
        for pipe in pipes:
            pipe.send(("start",))
        sent = await paced_send(senders, protocol, config.messages, config.rate, config.pad)
        for pipe in pipes:
            pipe.send(("finish", sent.sent, sent.last_send_ns))
        reports: list[OpenLoopReport] = []
        for pipe in pipes:
            ready = await loop.run_in_executor(None, pipe.poll, config.run_timeout)
            if not ready:
                raise RuntimeError("subscribers did not report within the run timeout")
            _, report = pipe.recv()
            reports.append(report)
        cpu_s = cpu_seconds(server_pid) - cpu_before
        sent.echoes = echoes[0]
        return sent, reports, cpu_s
    finally:
        for client in senders:
            client.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.closed for c in senders)), 2)


def _tally(result: OpenLoopResult, reports: list[OpenLoopReport], sent: PacedSend) -> None:
    tally(result, reports, sent.first_send_ns)
    result.sent = sent.sent
    result.echoes = sent.echoes
    result.drained = all(r.drained for r in reports)
    result.sender_lag_p99_ms, result.sender_lag_max_ms = sent.lag_p99_ms, sent.lag_max_ms
    result.receiver_lag_p99_ms = max((r.lag_p99_ms for r in reports), default=math.nan)
    result.receiver_cpu_busy = max((r.cpu_s / r.wall_s for r in reports if r.wall_s), default=0)
    result.generator_behind = (
        sent.lag_p99_ms > GENERATOR_LAG_MS or result.receiver_lag_p99_ms > GENERATOR_LAG_MS
    )


def fit_cost_split(results: list[OpenLoopResult]) -> tuple[float, float, float] | None:
    """Least squares of CPU = a x publishes + b x frames written, over runs of one server.

    Frames written = subscribers' deliveries + the sender's own copies (every server here
    writes a message back to its sender too). Returns (a, b) in µs and the RMS of the
    relative residuals, or None with fewer than 3 runs or a singular system.
    """
    runs = [r for r in results if not r.error and r.sent and r.cpu_s > 0]
    if len(runs) < 3:
        return None
    xs = [(float(r.sent), float(r.deliveries + r.echoes), r.cpu_s) for r in runs]
    spp = sum(p * p for p, _, _ in xs)
    sww = sum(w * w for _, w, _ in xs)
    spw = sum(p * w for p, w, _ in xs)
    spc = sum(p * c for p, _, c in xs)
    swc = sum(w * c for _, w, c in xs)
    det = spp * sww - spw * spw
    if det <= 0 or det < 1e-12 * spp * sww:
        return None
    a = (spc * sww - swc * spw) / det
    b = (swc * spp - spc * spw) / det
    residuals = [(a * p + b * w - c) / c for p, w, c in xs]
    rms = math.sqrt(sum(e * e for e in residuals) / len(residuals))
    return a * 1e6, b * 1e6, rms
