"""Issue 13's workers rows: the chat app on one Redis with ``--workers 2``, end to end.

A tiny run (10 subscribers, 20 messages) of the ``workers`` scenario: the harness waits for
both workers to serve, measures the whole process tree (the supervisor and its two workers),
loses nothing, and leaves no worker behind. Skipped when redis-server is missing. Nothing
about speed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import runner
from bench.cli import parse_args, plan
from bench.runner import RunConfig, run_one


def test_the_workers_scenario_plans_one_and_two_workers_at_the_redis_load() -> None:
    configs = plan(parse_args(["--servers", "chat,naive", "--scenario", "workers"]))
    assert [(c.server, c.workers, c.backend, c.nodes) for c in configs] == [
        ("chat", 1, "redis", 1),
        ("chat", 2, "redis", 1),
    ]
    redis = plan(parse_args(["--servers", "chat", "--scenario", "redis"]))
    assert {(c.clients, c.messages) for c in configs} == {(redis[0].clients, redis[0].messages)}


def test_two_workers_on_one_redis_lose_nothing_and_are_measured_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    trees: list[list[int]] = []
    wait = runner._wait_for_workers

    def recording(*args: object) -> list[int]:
        tree = wait(*args)  # type: ignore[arg-type]
        trees.append(tree)
        return tree

    monkeypatch.setattr(runner, "_wait_for_workers", recording)
    config = RunConfig("chat", "workers", 10, 20, backend="redis", workers=2, client_procs=1)
    result = run_one(config, tmp_path)
    assert result.error == "", result
    assert result.workers == 2
    assert result.sent == 20
    assert result.expected == result.deliveries == 10 * 20
    assert result.lost == result.duplicates == result.out_of_order == 0
    assert result.closed_early == result.failed_connects == 0
    # CPU is read in 10 ms ticks: a run this small may take none, so no figure is asserted;
    # that the whole tree was measured is what the recorded tree below shows.
    [tree] = trees
    assert len(tree) == 3  # the supervisor and its two workers
    for pid in tree:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    logs = list(tmp_path.glob("*-w2-node0.log"))
    assert len(logs) == 1
    assert logs[0].read_bytes().count(runner.READY_LINE) == 2
