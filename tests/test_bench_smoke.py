"""The benchmark harness still works: ``python -m bench --smoke`` end to end.

A tiny run (the chat app on uvicorn with and without wsbroadcast's protocol, the naive app and
python-socketio through the Socket.IO adapter; five subscribers, twenty messages, one client
process; fan-out in one room and the rooms scenario over two rooms) in a subprocess with a
bounded timeout. It asserts that the harness completed, lost nothing, delivered nothing to the
wrong room and wrote its table and plot; nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_DEADLINE = 60.0


def test_bench_smoke_run_completes_without_loss(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_DEADLINE,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    raw = json.loads(out.with_suffix(".json").read_text())
    results = raw["results"]
    servers = ["chat", "chat-asgi", "naive", "socketio"]
    assert [(r["scenario"], r["server"]) for r in results] == [
        *(("fanout", server) for server in servers),
        *(("rooms", server) for server in servers),
    ]
    for result in results:
        assert result["error"] == "", result
        assert result["clients"] == 5
        assert result["sent"] == result["messages"] == 20
        assert not result["froze"]
        assert result["failed_connects"] == result["closed_early"] == 0
        if result["scenario"] == "fanout":
            assert result["rooms"] == 1
            assert result["expected"] == result["deliveries"] == 5 * 20
        else:
            # Subscribers 0, 2, 4 in room 0 and 1, 3 in room 1; ten messages to each room.
            assert result["rooms"] == 2
            assert result["expected"] == result["deliveries"] == 3 * 10 + 2 * 10
        assert result["lost"] == result["duplicates"] == result["out_of_order"] == 0
        assert result["wrong_room"] == 0
        assert result["p99_ms"] > 0
    report = out.read_text()
    for server in servers:
        assert f"| fanout | {server} | 5 | 1 | 20 |" in report
        assert f"| rooms (2) | {server} | 5 | 1 | 20 |" in report
        assert f"- **Many rooms, {server}** (5 subscribers over 2 rooms" in report
    assert "## Where we stand against the targets of issue 5" in report
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_refuses_bad_arguments() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--servers", "nosuchserver"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_DEADLINE,
        check=False,
    )
    assert completed.returncode == 2
    assert "choose from" in completed.stderr
