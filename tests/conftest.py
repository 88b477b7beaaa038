"""Fixtures shared by the integration and chaos suites: a real local Redis Cluster.

The cluster is started once per session by :mod:`resilient_cache.devcluster` (six redis-server
processes on free loopback ports) and torn down at the end, or when the test process dies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from resilient_cache import RedisClusterClient, create_redis_cluster
from resilient_cache.devcluster import DevCluster, find_redis_server


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def standalone_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain (non-cluster) redis-server, for REDIS_URL and the migration example."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("standalone")
    process = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, 10, f"redis-server on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        probe.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(autouse=True)
def _no_stray_redis_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("REDIS_") and name != "REDIS_SERVER_BIN":
            monkeypatch.delenv(name)
