"""Run the JavaScript client's own tests (``node --test clients/js/test/``) from pytest, so
the project's one test command runs them: unit tests on a fake WebSocket and the shared
scenarios against the real chat app."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODE_TIMEOUT = 110.0
"""A hang guard under pytest's own 120 s, not a timing assertion."""


def node_command(node: str) -> list[str]:
    """``node --test``, with ``--experimental-websocket`` where WebSocket is not global (<22)."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    match = re.match(r"v(\d+)", version.stdout.strip())
    assert match is not None, version.stdout
    major = int(match.group(1))
    assert major >= 20, f"the JS client's tests need Node >= 20, not {version.stdout.strip()}"
    flags = ["--experimental-websocket"] if major < 22 else []
    return [node, *flags, "--test", "clients/js/test/"]


def test_js_client_suite() -> None:
    node = shutil.which("node")
    assert node is not None, "Node >= 20 is needed: apt-get install nodejs"
    result = subprocess.run(
        node_command(node),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        env={**os.environ, "WSBROADCAST_PYTHON": sys.executable},
        check=False,
    )
    summary = "\n".join(line for line in result.stdout.splitlines() if line.startswith("# "))
    assert result.returncode == 0, f"node --test failed:\n{result.stdout[-20000:]}\n{result.stderr}"
    assert re.search(r"^# pass [1-9]", result.stdout, re.M), summary
