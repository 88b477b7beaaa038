"""Chaos tests get a cluster of their own: they kill, stop and restart its nodes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resilient_cache.devcluster import DevCluster


@pytest.fixture(scope="module")
def chaos_cluster() -> Iterator[DevCluster]:
    with DevCluster(node_timeout_ms=2000) as cluster:
        yield cluster


@pytest.fixture
def ready_cluster(chaos_cluster: DevCluster) -> DevCluster:
    """Before each fault: every node up, every replica's link to its primary up."""
    for node in chaos_cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            chaos_cluster.restart(node)
    chaos_cluster.wait_ready(timeout=60)
    return chaos_cluster
