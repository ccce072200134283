"""Readings from ``/proc`` about a server process, and starting/stopping it (Linux only)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STARTUP_DEADLINE = 20.0
STOP_DEADLINE = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (its own threads, not its children)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The process's child processes (``/proc/<pid>/task/<pid>/children``: those of its main
    thread, which is where the chat app's ``--workers`` supervisor starts them)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(part) for part in text.split()]


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_kib(pid: int) -> int:
    """Resident set size now (``VmRSS``), KiB."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (``VmHWM``), KiB."""
    return _status_kib(pid, "VmHWM")


@dataclass
class ServerProcess:
    """One server under test, as a subprocess listening on 127.0.0.1:``port``."""

    name: str
    command: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, cwd: Path) -> None:
        """Start it and wait (bounded) until its port accepts connections."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + STARTUP_DEADLINE
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at startup; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen within the deadline") from None
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait. Safe to call twice."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_DEADLINE)


def wait_quiet(pid: int, *, idle_cpu: float = 0.01, step: float = 0.2, limit: float = 30.0) -> None:
    """Wait until the process uses under ``idle_cpu`` CPU seconds per ``step`` (bounded)."""
    deadline = time.monotonic() + limit
    before = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_seconds(pid)
        if now - before < idle_cpu:
            return
        before = now


def _node_versions() -> str:
    """Node's version and the installed ``ws``'s (the Node server under test)."""
    node = shutil.which("node")
    if node is None:
        return "node not installed"
    try:
        version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        version = "?"
    package = Path(__file__).resolve().parent / "servers" / "node" / "node_modules" / "ws"
    try:
        ws = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        ws = "not installed"
    return f"node {version}, ws {ws}"


def machine_description() -> dict[str, str]:
    """CPU model, cores, memory, kernel, Python and the server software's versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    versions = []
    for module in ("uvicorn", "starlette", "websockets", "uvloop", "httptools"):
        try:
            version = __import__(module).__version__
        except ImportError:
            version = "not installed"
        except AttributeError:
            version = "?"
        versions.append(f"{module} {version}")
    for distribution in ("broadcaster", "python-socketio", "python-engineio"):
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        versions.append(f"{distribution} {version}")
    versions.append(_node_versions())
    return {
        "cpu": model,
        "cores": f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "software": ", ".join(versions),
        "executable": sys.executable,
    }
