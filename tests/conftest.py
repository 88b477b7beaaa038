"""Fixtures shared by the integration and chaos suites: a real local Redis Cluster.

The cluster is started once per session by :mod:`resilient_cache.devcluster` (six redis-server
processes on free loopback ports) and torn down at the end, or when the test process dies.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster, StandaloneServer


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def devcluster() -> Iterator[DevCluster]:
    with DevCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster_nodes(devcluster: DevCluster) -> str:
    devcluster.wait_ready(timeout=30)
    return devcluster.startup_nodes


@pytest.fixture
async def client(cluster_nodes: str) -> AsyncIterator[RedisClusterClient]:
    cluster = create_redis_cluster(cluster_nodes, health_check_interval=0, autoload=False)
    async with cluster:
        yield cluster


@pytest.fixture(scope="session")
def standalone_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain (non-cluster) redis-server, for REDIS_URL and the migration example."""
    # In pytest's temporary directory, so the server's log outlives the session.
    with StandaloneServer(base_dir=tmp_path_factory.mktemp("standalone")) as server:
        yield server.url


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--auto-pipeline",
        action="store_true",
        help="run every test with REDIS_AUTO_PIPELINE=true (clients that set auto_pipeline "
        "themselves keep their choice)",
    )


@pytest.fixture(autouse=True)
def _no_stray_redis_environment(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    for name in list(os.environ):
        if name.startswith("REDIS_") and name != "REDIS_SERVER_BIN":
            monkeypatch.delenv(name)
    if request.config.getoption("--auto-pipeline"):
        monkeypatch.setenv("REDIS_AUTO_PIPELINE", "true")
