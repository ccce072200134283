"""A real local Redis Cluster (three primaries, one replica each) for the cluster tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_ports
from wsbroadcast.backends.redis import RedisClusterBackend
from wsbroadcast.backends.redis.keys import KeyLayout

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
"""redis-py's asyncio client does not run on trio: every cluster test runs on asyncio only."""

FAST = {
    "heartbeat_interval": 0.2,
    "presence_ttl": 1.0,
    "block_timeout": 1.0,
    "command_timeout": 1.0,
    "backoff_initial": 0.02,
    "backoff_max": 0.2,
}
"""Timings in tenths of seconds, so that faults are noticed within the tests' bounds."""

NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout``: small, so a killed primary's replica is promoted in seconds."""


def _join_group(group: int) -> Callable[[], None]:
    """A ``preexec_fn`` that puts the child in process group ``group`` (0: a new one)."""

    def join() -> None:
        os.setpgid(0, group)

    return join


def command(port: int, *args: str) -> str:
    """Run one redis-cli command against 127.0.0.1:``port`` and return its raw output."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout


class LocalCluster:
    """Six ``redis-server --cluster-enabled yes`` processes in one process group.

    Started with :meth:`start`, stopped with :meth:`stop`; every server runs in a new
    session whose group id this object kills at the end. A watchdog shell in the same group
    kills it too if the test process dies without cleaning up.
    """

    def __init__(self, directory: Path, nodes: int = 6) -> None:
        self.directory = directory
        self.ports = free_ports(nodes, below=65536 - 10000)  # and their bus ports + 10000
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.group: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming every node."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+cluster://{hosts}/"

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.directory / str(port)
        node_dir.mkdir(exist_ok=True)
        args = [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1"),
            *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
            *("--cluster-node-timeout", str(NODE_TIMEOUT_MS)),
            # A replica may be promoted however long its link was down (the default refuses
            # one that lost its primary more than 10 node timeouts ago).
            *("--cluster-replica-validity-factor", "0"),
            *("--save", "", "--appendonly", "no", "--dir", str(node_dir)),
            *("--loglevel", "warning", "--logfile", str(node_dir / "log")),
        ]
        if self.group is None:
            # The first server leads a new process group that holds every server and the
            # watchdog: killing the group kills them all.
            process = subprocess.Popen(args, preexec_fn=_join_group(0))
            self.group = process.pid
        else:
            process = subprocess.Popen(args, preexec_fn=_join_group(self.group))
        return process

    def start(self, deadline: float = 30.0) -> None:
        """Start the servers, create the cluster (one replica per primary) and wait until
        every node says ``cluster_state:ok`` and agrees on the primaries."""
        end = time.monotonic() + deadline
        for port in self.ports:
            self.processes[port] = self._spawn(port)
        assert self.group is not None
        # Kills the whole group once the test process (our parent) is gone.
        self._watchdog = subprocess.Popen(
            [
                "sh",
                "-c",
                f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill -9 -{self.group}",
            ],
            preexec_fn=_join_group(self.group),
            stdin=subprocess.DEVNULL,
        )
        for port in self.ports:
            self._wait(lambda port=port: command(port, "PING").strip() == "PONG", end)
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            capture_output=True,
            text=True,
            timeout=max(1.0, end - time.monotonic()),
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}")
        self.wait_ok(end)

    def wait_ok(self, end: float) -> None:
        """Wait until every running node reports ``cluster_state:ok``, there are 3 primaries,
        and every running replica's link to its primary is up (it holds the primary's data,
        so a kill -9 of the primary is followed by its promotion)."""

        def ok() -> bool:
            for port in self.alive():
                if "cluster_state:ok" not in command(port, "CLUSTER", "INFO"):
                    return False
                replication = command(port, "INFO", "replication")
                if "role:slave" in replication and "master_link_status:up" not in replication:
                    return False
            return len(self.primaries()) == 3

        self._wait(ok, end)

    @staticmethod
    def _wait(predicate: object, end: float) -> None:
        assert callable(predicate)
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError("the local Redis Cluster did not get ready in time")
            time.sleep(0.05)

    def alive(self) -> list[int]:
        """Ports of the servers still running."""
        return [port for port, process in self.processes.items() if process.poll() is None]

    def slots(self) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, primary port)`` per range, from a live node's
        ``CLUSTER NODES`` (primaries marked failed excluded)."""
        port = self.alive()[0]
        out: list[tuple[int, int, int]] = []
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                first, _, last = part.partition("-")
                out.append((int(first), int(last or first), node_port))
        return sorted(out)

    def primaries(self) -> list[int]:
        """Ports of the nodes that serve slots now."""
        return sorted({port for _, _, port in self.slots()})

    def owner(self, slot: int) -> int:
        """The port of the primary that serves ``slot``."""
        for first, last, port in self.slots():
            if first <= slot <= last:
                return port
        raise LookupError(slot)

    def wait_failover(self, killed: int, deadline: float) -> None:
        """Wait (at most ``deadline`` seconds) until the replica of the killed primary
        ``killed`` serves its slots and every live node says ``cluster_state:ok``."""
        end = time.monotonic() + deadline
        self._wait(lambda: killed not in self.primaries(), end)
        self.wait_ok(end)

    def replica_of(self, primary: int) -> int:
        """The port of the replica of the primary on port ``primary``."""
        ids: dict[str, int] = {}
        masters: dict[int, str] = {}
        for line in command(self.alive()[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            ids[fields[0]] = port
            if fields[3] != "-":
                masters[port] = fields[3]
        return next(port for port, master in masters.items() if ids[master] == primary)

    def freeze(self, port: int) -> None:
        """SIGSTOP one server: it reads nothing until :meth:`thaw`."""
        self.processes[port].send_signal(signal.SIGSTOP)

    def thaw(self, port: int) -> None:
        """SIGCONT a frozen server."""
        self.processes[port].send_signal(signal.SIGCONT)

    def kill(self, port: int) -> None:
        """``kill -9`` one server: no shutdown, no save, its connections cut."""
        process = self.processes[port]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self) -> None:
        """Kill every server and the watchdog (the whole process group)."""
        if self.group is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.group, signal.SIGKILL)
        for process in self.processes.values():
            process.wait()
        if self._watchdog is not None:
            self._watchdog.wait()


@contextmanager
def local_cluster(directory: Path) -> Iterator[LocalCluster]:
    """A started :class:`LocalCluster`, stopped (every process killed) at the end."""
    cluster = LocalCluster(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def rooms_per_primary(
    cluster: LocalCluster, layout: KeyLayout, candidates: Iterable[str], count: int
) -> dict[int, list[str]]:
    """``count`` names from ``candidates`` for each primary, by the slot of their partition."""
    found: dict[int, list[str]] = {port: [] for port in cluster.primaries()}
    slots = cluster.slots()
    for name in candidates:
        slot = layout.slot(layout.partition(name))
        port = next(port for first, last, port in slots if first <= slot <= last)
        if len(found[port]) < count:
            found[port].append(name)
        if all(len(names) == count for names in found.values()):
            return found
    raise LookupError(f"not enough candidates for {count} rooms per primary")


def audit(messages: list[dict[str, Any]], room: str) -> tuple[int, int]:
    """Check one client's frames of ``room``: exact, or explicitly reset, never silent.

    Within an epoch every envelope has the seq after the one before it (no gap, no repeat);
    the epoch changes only through a ``history_lost`` frame, after which the room goes on in
    that frame's epoch at a seq no later than its ``last_seq + 1`` (exactly that for a reset
    of a live stream; at a connect, the client's own ``join``, which may be older: see
    docs/protocol.md), then gap-free; no ``(epoch, seq)`` comes twice. Returns the numbers
    of envelopes and of ``history_lost`` frames.
    """
    epoch: str | None = None
    expected: int | None = None
    at_most: int | None = None
    """After a history_lost: the latest seq the next envelope may have."""
    seen: set[tuple[str, int]] = set()
    envelopes = resets = 0
    for message in messages:
        if message.get("room") != room:
            continue
        if message["type"] == "history_lost":
            resets += 1
            epoch, expected = message["data"]["epoch"], None
            at_most = message["data"]["last_seq"] + 1
            continue
        if "seq" not in message:
            continue
        position = (message["epoch"], message["seq"])
        assert position not in seen, f"{position} delivered twice"
        seen.add(position)
        if epoch is not None:
            assert message["epoch"] == epoch, f"epoch changed silently at {position}"
        if expected is not None:
            assert message["seq"] == expected, f"silent gap: {position}, expected {expected}"
        elif at_most is not None:
            assert message["seq"] <= at_most, f"silent gap: {position} after the reset"
        epoch, expected, at_most = message["epoch"], message["seq"] + 1, None
        envelopes += 1
    return envelopes, resets


def node_factory(cluster: LocalCluster, prefix: str) -> Callable[..., RedisClusterBackend]:
    """Build cluster backend nodes with fast timings and a key prefix of their own."""

    def make(**options: Any) -> RedisClusterBackend:
        return RedisClusterBackend(cluster.url, prefix=prefix, **{**FAST, **options})

    return make
