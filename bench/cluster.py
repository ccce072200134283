"""A local Redis Cluster for the ``cluster`` scenario, from the cluster tests' own helper.

The cluster tests already start a real local cluster (``tests/backends/redis/cluster/
cluster_helpers.py``: six ``redis-server --cluster-enabled yes`` in one process group, three
primaries with a replica each, created with ``redis-cli --cluster create``, a watchdog that
kills the group if its parent dies). The bench imports that module by its path rather than
keeping a copy that could drift; it needs what the tests need (``redis-server``,
``redis-cli``, the ``redis`` and ``pytest`` packages of the ``dev`` extra).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

HELPERS = (
    Path(__file__).resolve().parents[1]
    / "tests"
    / "backends"
    / "redis"
    / "cluster"
    / "cluster_helpers.py"
)
MODULE_NAME = "bench_cluster_helpers"


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here (None: it can)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install redis-server redis-tools)"
    if not HELPERS.exists():
        return f"{HELPERS} is missing"
    try:
        _helpers()
    except ImportError as exc:
        return f"the cluster helper cannot be imported: {exc} (pip install -e . --group dev)"
    return None


def _helpers() -> ModuleType:
    module = sys.modules.get(MODULE_NAME)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(MODULE_NAME, HELPERS)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HELPERS}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module


@contextmanager
def local_cluster() -> Iterator[Any]:
    """A started ``LocalCluster`` (``.url``, ``.processes``: port -> Popen) in a temporary
    directory; every server killed and the directory removed at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        cluster = _helpers().LocalCluster(Path(directory))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def server_pids(cluster: Any) -> list[int]:
    """The pids of the cluster's redis-servers (primaries and replicas)."""
    return [process.pid for process in cluster.processes.values()]
