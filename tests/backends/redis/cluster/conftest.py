"""A real local Redis Cluster: six redis-servers (three primaries, one replica each)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.backends.redis.cluster.cluster_helpers import LocalCluster, local_cluster, node_factory
from wsbroadcast.backends.redis import RedisClusterBackend


def _need_redis() -> None:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is not installed: the Redis Cluster tests need real servers "
                "(scripts/test installs them with apt-get install redis-server)"
            )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster for a whole test module (started once), every server killed at the end."""
    _need_redis()
    with local_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster for one test that kills its servers."""
    _need_redis()
    with local_cluster(tmp_path) as started:
        yield started


@pytest.fixture
def make_node(
    cluster: LocalCluster, request: pytest.FixtureRequest
) -> Callable[..., RedisClusterBackend]:
    """Nodes on the module's cluster, under a prefix named after the test (so tests that
    share the cluster share no key)."""
    return node_factory(cluster, f"t:{request.node.name}:")
