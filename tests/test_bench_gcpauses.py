"""bench.gcpauses runs the chat app both ways and reads its pauses from /metrics (no timing
is asserted: only that every phase ran and was reported)."""

from __future__ import annotations

import asyncio

from bench.gcpauses import run_mode, summary, table


def test_both_modes_run_every_phase_and_report_it() -> None:
    results = {freeze: asyncio.run(run_mode(freeze, 40, 2, 1)) for freeze in (False, True)}
    for phases in results.values():
        assert [p.name for p in phases] == ["started", "40 connected", "storm 1: 20 reconnected"]
        assert [p.connections for p in phases] == [0, 40, 40]
        assert all(p.rss_kib > 0 for p in phases)
        assert table(phases).count("\n") == 2 + len(phases) - 1
    assert all(p.frozen_objects == 0 for p in results[False]), "--no-gc-freeze froze"
    assert "Longest pause of the run" in summary(results[False], results[True])
