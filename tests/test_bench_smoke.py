"""The benchmark harness still works: ``python -m bench --smoke`` end to end.

A tiny run (two servers, five subscribers, twenty messages, one client process) in a
subprocess with a bounded timeout. It asserts that the harness completed, lost nothing and
wrote its table and plot; nothing about speed.
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
    assert [r["server"] for r in results] == ["chat", "naive"]
    for result in results:
        assert result["error"] == "", result
        assert result["clients"] == 5
        assert result["sent"] == result["messages"] == 20
        assert not result["froze"]
        assert result["failed_connects"] == 0
        assert result["expected"] == result["deliveries"] == 5 * 20
        assert result["lost"] == result["duplicates"] == result["out_of_order"] == 0
        assert result["p99_ms"] > 0
    report = out.read_text()
    assert "| fanout | chat | 5 | 1 | 20 |" in report
    assert "| fanout | naive | 5 | 1 | 20 |" in report
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
