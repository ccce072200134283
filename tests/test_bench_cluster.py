"""Issue 13's benchmark row: two chat-app nodes on a local Redis Cluster, end to end.

A tiny run (10 subscribers, 20 messages) of the ``cluster`` scenario: the cluster is started
by the cluster tests' helper, both nodes use it, nothing is lost, and every redis-server is
gone afterwards. Skipped with the reason when redis-server, redis-cli or the helper's
packages are missing. Nothing about speed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import cluster, runner
from bench.runner import RunConfig, run_one


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): ask /proc whether it is one.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_chat_nodes_on_a_local_redis_cluster_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reason = cluster.unavailable_reason()
    if reason is not None:
        pytest.skip(f"no local Redis Cluster here: {reason}")
    pids: list[int] = []

    def recording(started: object) -> list[int]:
        pids.extend(cluster.server_pids(started))
        return pids

    monkeypatch.setattr(runner, "server_pids", recording)
    config = RunConfig("chat", "cluster", 10, 20, nodes=2, backend="redis-cluster", client_procs=1)
    result = run_one(config, tmp_path)
    assert result.error == "", result
    assert result.sent == 20
    assert result.expected == result.deliveries == 10 * 20
    assert result.lost == result.duplicates == result.out_of_order == 0
    assert result.closed_early == result.failed_connects == 0
    assert len(pids) == 6
    assert not [pid for pid in pids if _alive(pid)]
